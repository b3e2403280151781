"""CPU forwards through frozen TorchScript graphs: the eager module's outputs, at any batch size,
from any thread; the eager forward where no faithful graph can be built."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers import graphs
from workers.backbones import CATALOGUE, OUTPUTS, load_backbone
from workers.extract import forward


def _inputs(sizes, input_size=(3, 224, 224), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, *input_size, generator=gen).contiguous(memory_format=torch.channels_last)
        for n in sizes
    ]


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_graph_outputs_equal_the_eager_modules_at_other_batch_sizes(name):
    bb = load_backbone(name, allow_random=True, weights_dir="/nonexistent")
    eager = load_backbone(name, allow_random=True, weights_dir="/nonexistent", graphs=False)
    # Traced at batch 2 and checked at 2 and 3 when built; used here at 1 and 5.
    with torch.inference_mode():
        for x in _inputs((1, 5)):
            for output in OUTPUTS:
                got, want = forward(bb, x, output), forward(eager, x, output)
                assert got.shape == want.shape
                assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert graphs.is_graph(graphs.graph(bb.model, bb.spec.input_size))
    assert not graphs.is_graph(graphs.Forward(eager.model))


def test_one_graph_serves_threads_side_by_side():
    bb = load_backbone("mobilenetv3_small_100", allow_random=True, weights_dir="/nonexistent")
    xs = _inputs((1, 4, 3, 6, 2, 5, 4, 1), seed=2)
    with torch.inference_mode():
        want = [graphs.Forward(bb.model)(x)[1] for x in xs]

    def run(x):
        with torch.inference_mode():
            return forward(bb, x, "pooled")

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, xs))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=0, atol=1e-5 * float(w.abs().max()))


class _SizeBound(torch.nn.Module):
    """A network whose output reads the batch size as a Python number: a trace freezes it."""

    def forward_features(self, x):
        return x.mean((2, 3)) * int(x.shape[0])

    def forward_head(self, feats, pre_logits=False):
        return feats


def test_a_graph_that_differs_from_the_module_is_not_used(caplog):
    model = _SizeBound()
    with caplog.at_level(logging.WARNING, logger="cvxtune.backbones"):
        net = graphs.graph(model, (3, 4, 4))
    assert not graphs.is_graph(net)
    assert "no TorchScript graph (outputs differ" in caplog.text
    x = _inputs((5,), (3, 4, 4))[0]
    assert torch.equal(net(x)[1], x.mean((2, 3)) * 5)
    assert graphs.graph(model, (3, 4, 4)) is net  # kept: not built again


def test_serving_builds_the_graph_when_it_loads_a_backbone():
    from workers.serving import Server

    server = Server(allow_random=True, device="cpu", runners=1)
    server.warm("mobilenetv3_small_100")
    batcher = server._batcher("mobilenetv3_small_100")
    try:
        assert graphs.is_graph(graphs.built(batcher.backbone.model))  # before any request
    finally:
        batcher.close()


def test_an_extraction_that_loads_its_backbone_runs_it_eagerly(monkeypatch, small_zip):
    import workers.extract
    from workers.extract import extract

    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_backbone(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(workers.extract, "load_backbone", spy)
    eager = extract(small_zip, "mobilenetv3_small_100", allow_random=True)
    assert [bb.graphs for bb in loaded] == [False]
    assert graphs.built(loaded[0].model) is None
    given = load_backbone("mobilenetv3_small_100", allow_random=True, weights_dir="/nonexistent")
    graphed = extract(small_zip, given)  # a Backbone passed in keeps its own setting
    assert graphs.is_graph(graphs.built(given.model))
    assert torch.allclose(torch.from_numpy(graphed.X), torch.from_numpy(eager.X), atol=1e-5)
