"""From the registry to the serving engines: deploy folders, a vLLM resolver plugin, runtime pushes, GGUF.

- :mod:`.deploy`: ``loramgr deploy ENGINE DIR``: a cache folder of ``name@version`` adapters in the layout
  vLLM's filesystem resolver, SGLang, TGI and LoRAX read, with the flags that serve them;
- :mod:`.vllm_plugin`: a vLLM ``LoRAResolver`` that answers ``model="name@version"`` from the registry;
- :mod:`.push`: ``loramgr push-to-server``: load / unload adapters in a running vLLM or SGLang;
- :mod:`.gguf`: llama.cpp LoRA GGUF files and Ollama Modelfiles (``loramgr export --format gguf|ollama``);
- :mod:`.guard`: the engine check every one of them runs first.
"""
