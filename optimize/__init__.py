"""optimize: recipe-driven model optimisation (export, precision, benchmark, gate, register)."""

__version__ = "0.1.0"
