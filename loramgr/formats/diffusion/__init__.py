"""LoRA files for diffusion transformers (Flux, SD3, Wan 2.x, HunyuanVideo, Qwen-Image): key conventions, one view.

A file is kept as it is (its bytes are what people share); reading it gives an
:class:`~loramgr.adapter.AdapterInfo` whose module names are real module paths of one of two namespaces
of the model family: the *original* checkpoint's (``double_blocks.0.img_attn.qkv``: what kohya,
ComfyUI, XLabs and musubi-tuner files name) or diffusers' (``transformer.transformer_blocks.0.attn.to_q``).
:mod:`.families` holds the module tables that map one namespace to the other exactly (fused qkv split
by rows, split q/k/v fused block-diagonally), :mod:`.read` recognises the conventions and
:mod:`.write` exports to each of them.
"""
