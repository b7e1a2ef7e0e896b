"""The HTTP search service, ``python -m indexer serve``: FastAPI and uvicorn over collections.

The only part of the project that imports web-server libraries (ARCHITECTURE.md). It reads
collections through :class:`indexer.collection.Collection` and decodes uploads through
:mod:`indexer.images`, like the command line and the app, and imports no torch, so a serving
install (``requirements-serving.txt``) needs neither PyTorch nor CUDA. One module per job:

* :mod:`indexer.server.options`: the ``serve`` command's options and their checked form;
* :mod:`indexer.server.auth`: the API key file and its constant-time check;
* :mod:`indexer.server.live`: a served collection that follows new generations;
* :mod:`indexer.server.batcher`: concurrent uploads batched through one model;
* :mod:`indexer.server.schemas`: the typed requests and answers (the OpenAPI page);
* :mod:`indexer.server.api`: the endpoints and the one-line 4xx answers;
* :mod:`indexer.server.lane`: JSON searches answered beside FastAPI's routing (the hot path);
* :mod:`indexer.server.launch`: binding, workers and uvicorn;
* :mod:`indexer.server.local`: starting a real server for tests and benchmarks.

Importing this package imports nothing else, so ``python -m indexer --help`` stays instant.
"""
