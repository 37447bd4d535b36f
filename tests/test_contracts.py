"""The published contracts: OpenAPI and AsyncAPI documents built from the schema
files, checked by third-party validators, and the running API checked against them
by schemathesis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from tornado.httpclient import AsyncHTTPClient

from engine.core.config import PROJECT_ROOT
from engine.ops.redis_server import RedisServer, free_port
from engine.web import apidocs
from engine.web.schemas import Schemas
from tests.helpers import eventually, start_server, stop_server

VENDOR = Path(__file__).parent / "vendor"


def asyncapi_validator() -> Draft7Validator:
    spec = json.loads((VENDOR / "asyncapi-3.0.0.schema.json").read_text())
    resources = [(spec["$id"], Resource.from_contents(spec, default_specification=DRAFT7))]
    for definition in spec["definitions"].values():
        if isinstance(definition, dict) and "$id" in definition:
            resources.append(
                (definition["$id"], Resource.from_contents(definition, default_specification=DRAFT7))
            )
    return Draft7Validator(spec, registry=Registry().with_resources(resources))


@pytest.mark.parametrize("name", ["openapi", "asyncapi"])
def test_committed_documents_are_current(schemas: Schemas, name: str) -> None:
    built = apidocs.render(getattr(apidocs, name)(schemas))
    committed = (apidocs.DOCS_DIR / f"{name}.json").read_text()
    assert committed == built, "run `python -m engine.web.apidocs` and commit docs/"


def test_openapi_document_is_valid_openapi_3_1(schemas: Schemas) -> None:
    document = apidocs.openapi(schemas)
    validate_openapi(document)
    # Every component is one of our schema files (or a shared definition): no shape
    # is written twice.
    titles = {doc["title"] for doc in schemas.documents.values() if "title" in doc}
    shared = set(schemas.documents["common"]["$defs"])
    assert set(document["components"]["schemas"]) <= titles | shared


def test_asyncapi_document_is_valid_asyncapi_3_0(schemas: Schemas) -> None:
    validator = asyncapi_validator()
    document = apidocs.asyncapi(schemas)
    assert [e.message for e in validator.iter_errors(document)] == []
    # The validator does catch mistakes.
    broken = {**document, "channels": {"orderStatus": {"address": 7}}}
    assert list(validator.iter_errors(broken))


async def test_documents_are_served(http_server_client: Any, schemas: Schemas) -> None:
    for name in ("openapi", "asyncapi"):
        response = await http_server_client.fetch(f"/api/{name}.json")
        assert json.loads(response.body) == getattr(apidocs, name)(schemas)


@pytest.fixture
def live_server(redis_server: RedisServer, clean_redis: None, tmp_path: Path) -> Any:
    """server.py in its own process (schemathesis's client is synchronous)."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "SERVER_PORT": str(port), "LOG_LEVEL": "WARNING"}
    proc = start_server(env, tmp_path / "server.log")
    yield port, proc, tmp_path / "server.log"
    stop_server(proc, timeout=20)


async def test_schemathesis_finds_no_server_error_or_contract_violation(live_server: Any) -> None:
    port, proc, log = live_server
    http = AsyncHTTPClient()

    async def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return (await http.fetch(f"http://127.0.0.1:{port}/healthz", raise_error=False)).code == 200
        except OSError:
            return False

    await eventually(up, timeout=30, interval=0.1, message="server up")
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [
            str(st), "--config-file", str(PROJECT_ROOT / "tests" / "schemathesis.toml"),
            "run", f"http://127.0.0.1:{port}/api/openapi.json",
            "--max-examples", "60", "--generation-deterministic",
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
             "PYTHONPATH": str(PROJECT_ROOT)},
    )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert "passed" in summary and "failed" not in summary.lower().split("summary")[-1]
    assert " 500 " not in log.read_text()
