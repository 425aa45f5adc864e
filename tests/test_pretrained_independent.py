"""The shipped digits model draws digits that a classifier fastdiff did NOT train
recognises: scikit-learn's SVC, fitted here on the raw digits train split."""
import pytest
import torch

import fastdiff
from fastdiff.data import load_digits


@pytest.fixture(scope="module")
def svc():
    from sklearn.svm import SVC
    x, y = load_digits("train")
    clf = SVC(gamma="scale", C=10.0)
    clf.fit(_features(x), y.numpy())
    xt, yt = load_digits("test")
    acc = (clf.predict(_features(xt)) == yt.numpy()).mean()
    assert acc >= 0.97, f"independent classifier too weak to judge samples: {acc:.3f}"
    return clf


def _features(x):
    # sklearn's digits are 0..16 intensities; fastdiff images are [-1, 1].
    return ((x.clamp(-1, 1) + 1) * 8).reshape(len(x), -1).double().numpy()


@pytest.mark.parametrize("name", ["digits", "digits-baseline"])
def test_samples_recognised_by_independent_classifier(svc, name):
    model, schedule = fastdiff.pretrained(name)
    labels = torch.arange(100) % 10
    with torch.no_grad():
        x = fastdiff.sample(model, (100, 1, 8, 8), schedule=schedule, sampler="dpm++2m",
                            steps=20, cond=labels, seeds=range(100), progress=False)
    pred = torch.from_numpy(svc.predict(_features(x)))
    assert set(pred.tolist()) == set(range(10)), "not all ten classes were drawn"
    acc = (pred == labels).float().mean().item()
    assert acc >= 0.9, f"{name}: the independent classifier agrees on only {acc:.2f}"
