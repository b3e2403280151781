"""`cvxtune embed`, through the real dispatcher."""

from __future__ import annotations

import numpy as np

from cvxtune.cli import main
from workers.extract import load_npz

MOBILE = "mobilenetv3_small_100"


def test_embed_writes_an_npz_and_uses_the_cache(tmp_path, small_zip, capsys, monkeypatch):
    monkeypatch.delenv("CVXTUNE_WEIGHTS_DIR", raising=False)
    out = tmp_path / "emb.npz"
    args = ["embed", "--backbone", MOBILE, "--data", str(small_zip), "--out", str(out),
            "--allow-random-weights", "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "embedding 100%" in err and "img/s" in err
    assert f"wrote {out}: X (12, 1024) float32, 3 classes" in err
    got = load_npz(out)
    assert got["X"].shape == (12, 1024) and got["X"].dtype == np.float32
    assert got["y"].dtype == np.int64 and list(got["classes"]) == [
        "sneaker",
        "trouser",
        "tshirt_top",
    ]
    assert [got["classes"][k] for k in got["y"]] == [p.split("/")[1] for p in got["paths"]]

    out2 = tmp_path / "tokens.npz"
    tokens = [*args[:5], "--out", str(out2), *args[7:], "--output", "tokens", "--quiet"]
    assert main(tokens) == 0
    assert load_npz(out2)["X"].shape == (12, 49, 576)

    assert main(args) == 0
    assert "(cache)" in capsys.readouterr().err
    assert np.array_equal(load_npz(out)["X"], got["X"])


def test_embed_errors_are_reported_not_raised(tmp_path, small_zip, capsys, monkeypatch):
    monkeypatch.delenv("CVXTUNE_WEIGHTS_DIR", raising=False)
    out = tmp_path / "emb.npz"
    code = main(["embed", "--backbone", MOBILE, "--data", str(small_zip), "--out", str(out),
                 "--weights-dir", str(tmp_path)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert f"no weights for backbone '{MOBILE}'" in err and not out.exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"nope")
    code = main(["embed", "--backbone", MOBILE, "--data", str(bad), "--out", str(out)])
    assert code == 1
    assert "not a zip or tar archive" in capsys.readouterr().err
