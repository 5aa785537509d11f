"""The training side of one run's members: the weight-distance sanity check (relative L2
distance between final weights, over pairs) and the loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit import store
from toolkit.analyse.common import NAN, log, mean_std
from toolkit.config import StudyConfig
from toolkit.errors import CheckpointError
from toolkit.study import Layout, Member


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from toolkit.checkpoint import verify_export

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(path)
    verify_export(path)  # a truncated export is a CheckpointError naming the file
    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file "
                                  f"({' '.join(str(e).split())}); rerun training for this member: "
                                  f"toolkit run {store.study_ref(f)} --force train") from e
    return state


def _final_weights_dir(layout: Layout, m: Member) -> Path:
    import json

    marker = layout.train_marker(m)
    rel = "checkpoints/final"
    if marker.exists():
        rel = json.loads(marker.read_text(encoding="utf-8")).get("final", rel)
    return layout.member_dir(m) / rel


def weights_run(study: StudyConfig, run: str, ms: list[Member]) -> tuple[float, float]:
    """Mean and std over pairs of the relative L2 distance between final weights.

    Only two members' weights are held at a time.
    """
    from toolkit.metrics import weight_distance

    layout = Layout(study)
    dists = []
    try:
        for i in range(len(ms)):
            a = _load_weights(_final_weights_dir(layout, ms[i]))
            for j in range(i + 1, len(ms)):
                dists.append(weight_distance(a, _load_weights(_final_weights_dir(layout, ms[j]))))
    except FileNotFoundError as e:
        log.warning("%s: no safetensors weights in %s; weight_distance is NaN", run, e)
        return NAN, NAN
    return mean_std(dists)


def loss_run(study: StudyConfig, ms: list[Member]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """seed -> (step, loss) of each complete member that has a train store."""
    layout = Layout(study)
    curves = {}
    for m in ms:
        path = layout.member_store(m, "train")
        if not path.exists():
            log.warning("%s: no train.zarr; its loss curve is left out", m.id)
            continue
        g = store.open_store(path, "train")
        curves[m.seed] = (np.asarray(g["step"][...], np.float64), np.asarray(g["loss"][...], np.float64))
    return curves

