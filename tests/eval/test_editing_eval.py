"""`arcdiff eval editing` runs for real on a tiny model and made-up digits: its table, record and
pictures are written and consistent (the figures themselves are in docs/evaluation.md)."""

import json
import struct

import numpy as np

from arcdiff.eval import editing


def test_eval_editing_writes_its_table(tmp_path, model_dir):
    digits = np.zeros((4, 8, 8), np.uint8)
    digits[:, 2:6, 3:5] = 255  # bars for ones
    idx = tmp_path / "t10k-images-idx3-ubyte"
    idx.write_bytes(struct.pack(">IIII", 0x803, 4, 8, 8) + digits.tobytes())
    out = tmp_path / "out"
    argv = [
        "--data", str(idx), "--model", "tiny", "--model-dir", str(model_dir), "--images", "4", "--steps", "2,8",
        "--solvers", "heun,ddim", "--inpaint-steps", "2", "--frames", "3", "--out", str(out),
    ]  # fmt: skip
    assert editing.main(argv) == 0
    rec = json.loads((out / "editing.json").read_text())
    rows = {(r["solver"], r["steps"]): r for r in rec["round_trip"]}
    assert set(rows) == {("heun", 2), ("heun", 8), ("ddim", 2), ("ddim", 8)}
    assert rows[("heun", 8)]["nfe"] == 32 and rows[("ddim", 2)]["nfe"] == 4
    for r in rows.values():
        assert 0 <= r["rms_grey"] <= r["worst_image_rms_grey"] <= r["max_grey"]
    assert rec["command"].startswith("arcdiff eval editing --data")
    inp = rec["inpainting"]
    assert 0 <= inp["bottom_confident"] <= 1 and 0 <= inp["right_same_label"] <= 1
    assert (out / "editing.png").stat().st_size > 100 and (out / "editing_interpolation.png").stat().st_size > 100
    assert "| heun | 8 | 32 |" in (out / "editing.md").read_text()
