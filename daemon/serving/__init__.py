"""Serving: the model servers a built model is registered in and answered by, and what they can do.

Owns what every model server client needs against a broken or hostile server (``http``: the total
deadline, bounded answer reading, no redirects, JSON shape checks), the Ollama HTTP client
(``ollama``: typed errors, bounded retries), the client of an OpenAI-compatible chat server such as
llama.cpp's (``openai``: chat completions and the served models, retries that honour Retry-After,
errors that never repeat a server's text), registering a model set or an adapter and checking it
answers (``register``), the adapter merged into its base GGUF by llama.cpp's tools for an Ollama
that will not take it (``merge``), and the capability report that says whether a model can be fine-tuned and
served here (``capability``), a managed llama.cpp server for a GGUF base and its adapter
(``llamaserver``), and a head's vectors through llama-server: the base GGUF cut after each layer the
head reads, served for embeddings (``headserver``). May import: the top-level base
modules (``errors``, ``text``, ``config``, ``fsutil``, ``portable``, ``logconfig``, ``llamacpp``), ``daemon.data``,
``daemon.outputs`` (the output folder's files and its reader), ``daemon.training`` (where the base
weights are and which adapter files exist) and this package;
never ``quality``, ``inbox``, ``fine_tuner`` or ``cli``.
"""
