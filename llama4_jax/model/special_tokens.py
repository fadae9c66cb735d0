"""Special-token ids and the HF generation config that travel with a model's weights.

They are not architecture (ModelConfig holds only that): a params checkpoint keeps them in
`special_tokens.json` (+ `generation_config.json`), a training checkpoint in its meta, and
`convert to-hf` writes them back into config.json and generation_config.json. None means
unknown, and is written as null rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

TokenIds = int | tuple[int, ...] | None


def _ids(x: Any) -> TokenIds:
    """HF allows one id or a list of ids (Scout's eos); lists become tuples so the record stays frozen."""
    if x is None or isinstance(x, int):
        return x
    return tuple(int(i) for i in x)


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    # The source's generation_config.json verbatim (JSON-able), or None if it had none.
    generation_config: Mapping[str, Any] | None = None

    def ids(self) -> dict:
        """The three ids as config.json spells them (tuples as lists)."""
        as_json = lambda v: list(v) if isinstance(v, tuple) else v
        return {"bos_token_id": as_json(self.bos_token_id), "eos_token_id": as_json(self.eos_token_id),
                "pad_token_id": as_json(self.pad_token_id)}

    def to_dict(self) -> dict:
        gen = None if self.generation_config is None else dict(self.generation_config)
        return {**self.ids(), "generation_config": gen}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SpecialTokens":
        d = d or {}
        gen = d.get("generation_config")
        return cls(_ids(d.get("bos_token_id")), _ids(d.get("eos_token_id")), _ids(d.get("pad_token_id")),
                   None if gen is None else dict(gen))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpecialTokens":
        """The ids a tokenizer really has (its `special_ids`); a tokenizer without them gives nulls."""
        return cls.from_dict(getattr(tokenizer, "special_ids", None))

    def known(self) -> bool:
        return any(v is not None for v in self.ids().values()) or self.generation_config is not None

    def hf_generation_config(self) -> dict:
        """generation_config.json: the source's, or one built from the ids when it had none."""
        if self.generation_config is not None:
            return dict(self.generation_config)
        return {k: v for k, v in self.ids().items() if v is not None}
