"""The MLflow registry: register a finished run's passing variants (`publish_new`, `register_run`), move and
roll back aliases (`promote`, `rollback`, `canary_manifest`), smoke-check a registered version (`smoke`).

connection (which store, the bounded session, the error mapping) ← record (the run directory, `Registration`)
← reuse (what the store holds already) ← publish; description (the version's text), tags (every tag and alias
name), promotion, smoke and folders (what a registered version carries) beside them.
"""

from optimize.registry.connection import (
    check_reachable,
    http_status,
    is_connection_error,
    registry_failure,
    registry_timeout_s,
    resolve_tracking_uri,
    session,
    store_lock,
)
from optimize.registry.folders import write_folders
from optimize.registry.promotion import canary_manifest, promote, rollback
from optimize.registry.publish import publish, publish_new, register_run
from optimize.registry.record import Registration, failure_record, retry_command, success_record
from optimize.registry.reuse import already_registered
from optimize.registry.smoke import ONNX_TARGETS, smoke, smoke_record

__all__ = [
    "ONNX_TARGETS",
    "Registration",
    "already_registered",
    "canary_manifest",
    "check_reachable",
    "failure_record",
    "http_status",
    "is_connection_error",
    "promote",
    "publish",
    "publish_new",
    "register_run",
    "registry_failure",
    "registry_timeout_s",
    "resolve_tracking_uri",
    "retry_command",
    "rollback",
    "session",
    "smoke",
    "smoke_record",
    "store_lock",
    "success_record",
    "write_folders",
]
