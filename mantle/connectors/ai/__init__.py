"""The AI connectors (SPEC 13.6): ``ai/completion`` and ``ai/embed`` against any server that
speaks the OpenAI HTTP API (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM...).

- ``client``: the HTTP exchange (through ``mantle.connectors.http.send``), retries, metrics;
- ``params``: the checked params of ``ai/completion``;
- ``completion``: the chat completion and its durable tool loop; ``tools``: running tool calls;
- ``embed``: embeddings and pgvector literals; ``usage``: token counts, the ``mantle logs``
  line.
"""

from mantle.connectors.ai.completion import completion
from mantle.connectors.ai.embed import embed, pgvector_literal
from mantle.connectors.ai.usage import usage_line

__all__ = ["completion", "embed", "pgvector_literal", "usage_line"]
