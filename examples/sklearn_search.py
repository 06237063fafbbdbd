"""A scikit-learn hyper-parameter search on rented workers: one task per candidate.

Each candidate's cross-validation runs on a worker; the search picks the same parameters as
on this machine alone.  (joblib's Dask backend opens a client on each worker, which rented
workers may not do: a provider's worker must not act for you on the rest of the cluster.
Submitting the candidates from your client, as here, needs no such power.)

Run: python examples/sklearn_search.py
"""

from itertools import product

from distributed import Client
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.svm import SVC

from golem_dask import GolemCluster


def score(X, y, params):  # type: ignore[no-untyped-def]
    return cross_val_score(SVC(**params), X, y, cv=3).mean()


if __name__ == "__main__":
    X, y = make_classification(n_samples=600, n_features=20, random_state=0)
    grid = {"C": [0.1, 1, 10], "gamma": ["scale", 0.01, 0.1]}
    candidates = [dict(zip(grid, values)) for values in product(*grid.values())]
    local = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    with GolemCluster(n_workers=2, budget="1") as cluster, Client(cluster) as client:
        data = client.scatter([X, y], broadcast=True)
        scores = client.gather(client.map(score, *([d] * len(candidates) for d in data), candidates))
        ran_on = len(client.scheduler_info()["workers"])
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    assert candidates[best] == local.best_params_, (candidates[best], local.best_params_)
    assert abs(scores[best] - local.best_score_) < 1e-12
    print(cluster.bill())
    print(f"OK: best {candidates[best]} (score {scores[best]:.3f}) over {len(candidates)} candidates on {ran_on} "
          f"workers, paid {cluster.bill().total} GLM")
