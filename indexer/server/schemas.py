"""The typed requests and answers of the API: what FastAPI validates and the OpenAPI page shows.

Names and shapes are the contract clients rely on (issue 20): a hit is at least
``{"id", "path", "score", "label"}`` (``path`` relative to the collection's image root); fields
the library adds to :class:`indexer.collection.Hit` later pass through as extra keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BatchSearchAnswer", "CollectionInfo", "CollectionList", "EmbedAnswer", "ErrorAnswer", "Health",
           "HitOut", "ItemOut", "SearchAnswer", "SearchRequest"]


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class CollectionList(BaseModel):
    collections: list[str] = Field(description="the names served, each usable as {name} in the other paths")


class CollectionInfo(BaseModel):
    name: str
    count: int = Field(description="items indexed in this generation")
    skipped: int = Field(description="files that could not be indexed")
    dim: int = Field(description="embedding dimension D: a query vector has exactly D numbers")
    generation: int = Field(description="the committed generation answering now; grows with each update")
    updated: str = Field(description="when this generation was committed (UTC, ISO 8601)")
    model: dict[str, Any] = Field(description="sha256 and the moco.* properties of the model")
    index: dict[str, Any] = Field(description="the FAISS recipe with its measured recall@10")


class HitOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    path: str = Field(description="relative to the collection's image root")
    score: float = Field(description="cosine similarity, best first")
    label: str | None = Field(description="the first-level sub-folder, or null")


class SearchAnswer(BaseModel):
    hits: list[HitOut]


class BatchSearchAnswer(BaseModel):
    hits: list[list[HitOut]] = Field(description="one list of hits per query, in the order sent")


class SearchRequest(BaseModel):
    """Exactly one of ``vector``, ``id``, ``vectors`` or ``ids``, and optionally ``k``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": 17, "k": 5}]})

    vector: list[float] | None = Field(None, description="one query embedding of D numbers (any scale)")
    id: int | None = Field(None, description="an indexed item: its neighbours, the item itself left out")
    vectors: list[list[float]] | None = Field(None, description="a batch of query embeddings")
    ids: list[int] | None = Field(None, description="a batch of item ids")
    k: int = Field(10, description="hits per query")


class EmbedAnswer(BaseModel):
    embedding: list[float] = Field(description="the L2-normalised embedding, as the collection's vectors")
    model_sha256: str


class ItemOut(BaseModel):
    id: int
    path: str
    label: str | None
    width: int
    height: int
    size: int
    mtime_ns: int
    sha256: str | None


class ErrorAnswer(BaseModel):
    detail: str = Field(description="one line saying what was wrong")
