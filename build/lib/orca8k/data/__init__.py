"""The data side of the recipe: reading the three sources (`sources`, `readers`, `fetch`), the sampled mix
(`mixing`, `mix_output`), the demo data (`demo`, `demo_chat`, `demo_text`), the OA chat format and label masks
(`chat_format`), per-example token statistics (`token_stats`), packing (`packing`) and training-time collation
(`collate`)."""
