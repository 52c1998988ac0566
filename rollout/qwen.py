"""Qwen2.5-VL forward helpers shared by the rollout engine and the trainer (model passed in)."""

from __future__ import annotations

import torch


def image_embeddings(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Vision tower + merger: [P, D] patches -> [N_tokens, H] one row per <|image_pad|>."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with image features scattered into the <|image_pad|> slots: [T, H]."""
    embeds = model.model.get_input_embeddings()(input_ids)
    if pixel_values is not None and image_grid_thw is not None and image_grid_thw.shape[0]:
        feats = image_embeddings(model, pixel_values, image_grid_thw).to(embeds.dtype)
        slots = input_ids == model.config.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but the images give {feats.shape[0]} features")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
    return embeds
