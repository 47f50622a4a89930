"""artifacts/list and artifacts/get: what the registry knows."""

from __future__ import annotations

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import RpcError


def to_artifact(record) -> m.Artifact:
    return msgspec.convert(record.to_dict(), m.Artifact)


async def list_artifacts(params: m.ArtifactsListParams, ctx: Context) -> m.ArtifactsListResult:
    if params.limit < 1:
        raise RpcError.invalid_params("params.limit", "must be at least 1")
    records = ctx.services.registry.list_artifacts(kind=params.kind, limit=params.limit, parent=params.parent)
    return m.ArtifactsListResult([to_artifact(r) for r in records])


async def get_artifact(params: m.ArtifactsGetParams, ctx: Context) -> m.Artifact:
    record = ctx.services.registry.get_artifact(params.id)
    if record is None:
        raise RpcError.failed("artifact_not_found", f"no artifact with id {params.id!r}; artifacts/list shows what exists",
                              id=params.id)
    return to_artifact(record)
