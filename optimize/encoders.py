"""Torch modules that wrap a model source for export. Defining them needs torch, so this module is named
through optimize.lazy (`encoders = lazy("optimize.encoders")`) and imported only when a module is built."""

from __future__ import annotations

from optimize.lazy import lazy

torch = lazy("torch")


class PooledEncoder(torch.nn.Module):
    """A Hugging Face encoder whose output is the pooled (optionally normalised) sentence embedding."""

    def __init__(self, backbone: torch.nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "cls":
            out = hidden[:, 0]
        else:
            out = hidden
        if self.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out
