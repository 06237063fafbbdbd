"""Distributed LightGBM training on rented workers, through LightGBM's own Dask interface.

The training data is a dask.array spread over two workers; ``lightgbm.dask`` starts one
LightGBM process per worker holding data, and they grow each tree together over sockets
they open between themselves (data-parallel: the workers add up their histograms of
gradients).  Everything LightGBM asks of Dask comes from your client (submitting its
training tasks, asking who holds which chunk), so it runs under the rules for rented
workers, whose certificates may not act as clients.  The model is checked against
LightGBM trained on this machine alone: the same first tree (which a worker with only
its own rows could not grow) and the same accuracy on held-out rows.

On docker workers, build the worker image after installing lightgbm (``golem-dask image
build``): the image holds your environment, and its base the OpenMP runtime LightGBM loads.

Run: python examples/lightgbm_training.py
"""

import warnings
from typing import Any

import dask.array as da
import lightgbm as lgb
import numpy as np
from dask.utils import key_split
from distributed import Client, get_task_stream, wait
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from golem_dask import GolemCluster

PARAMS: dict[str, Any] = {"n_estimators": 60, "num_leaves": 15, "learning_rate": 0.1, "random_state": 0, "verbose": -1}


def splits(booster: lgb.Booster) -> list[tuple[int, float, float]]:
    """(feature, threshold, gain) of every split of the first tree, depth first."""
    nodes, found = [booster.dump_model()["tree_info"][0]["tree_structure"]], []
    while nodes:
        node = nodes.pop()
        if "split_feature" in node:
            found.append((node["split_feature"], node["threshold"], node["split_gain"]))
            nodes += [node["right_child"], node["left_child"]]
    return found


def main() -> None:
    # lightgbm.dask warns about its own default n_jobs, which it replaces by each worker's threads.
    warnings.filterwarnings("ignore", "Parameter n_jobs will be ignored")
    X, y = make_classification(n_samples=20_000, n_features=20, n_informative=8, flip_y=0.01, random_state=0)
    X = np.clip(np.round(X * 4), -12, 12) / 4  # 25 values a feature: every worker bins them as the whole data
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    local = lgb.LGBMClassifier(**PARAMS).fit(X_train, y_train)

    with GolemCluster(n_workers=2, cpu=1, memory="1GiB", budget="1") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        dX, dy = client.persist([da.from_array(X_train, chunks=(2500, -1)), da.from_array(y_train, chunks=2500)])
        wait([dX, dy])
        holders = {w for ws in client.who_has(dX).values() for w in ws}
        with get_task_stream(client) as stream:
            model = lgb.DaskLGBMClassifier(client=client, **PARAMS).fit(dX, dy)
        trained_on = {t["worker"] for t in stream.data if key_split(t["key"]) == "train_part"}
        pred = model.predict(da.from_array(X_test, chunks=2500)).compute()

    assert len(holders) == 2 and trained_on == holders, (holders, trained_on)
    ours, alone = splits(model.booster_), splits(local.booster_)
    assert [s[:2] for s in ours] == [s[:2] for s in alone], (ours, alone)
    assert np.allclose([s[2] for s in ours], [s[2] for s in alone], rtol=1e-4), (ours, alone)
    accuracy, local_accuracy = (pred == y_test).mean(), local.score(X_test, y_test)
    assert accuracy > 0.9 and abs(accuracy - local_accuracy) < 0.01, (accuracy, local_accuracy)  # chance: ~0.5
    print(cluster.bill())
    print(f"OK: LightGBM trained on {len(trained_on)} workers: first tree as alone ({len(ours)} splits), "
          f"held-out accuracy {accuracy:.3f} (alone: {local_accuracy:.3f}), paid {cluster.bill().total} GLM")


if __name__ == "__main__":
    main()
