"""Shared cases of the oracle's own tests (tests/0_oracle): the tiny model configuration and random pre-scaled
dropout masks keyed as oracle_model.model_forward reads them."""

TINY = dict(vocab_size=11, embedding_dim=8, num_heads=2, ff_dim=12, num_layers=2)


def _random_masks(cfg, B, T, p, rng):
    def m(shape):
        return (rng.random(shape) >= p) / (1.0 - p)
    C, H = cfg.embedding_dim, cfg.num_heads
    masks = {"emb": m((B, T, C))}
    for i in range(cfg.num_layers):
        masks[f"h.{i}.attn"] = m((B, H, T, T))
        masks[f"h.{i}.attn_resid"] = m((B, T, C))
        masks[f"h.{i}.mlp_resid"] = m((B, T, C))
    return masks
