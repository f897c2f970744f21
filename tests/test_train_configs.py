"""The recipes table: the original ACNet settings, overrides and validation."""
from __future__ import annotations

import pytest

import constructor
from train_configs import RECIPES, get_recipe, list_recipes
from train_configs.recipes import should_validate

# (global batch, lr, epochs, weight decay, gamma init) from the original repository's recipes
ORIGINAL = {
    "cfqkbnc": (128, 0.1, 150, 1e-4, 1 / 3),
    "vc": (128, 0.1, 400, 1e-4, 1 / 3),
    "src56": (128, 0.2, 400, 1e-4, 1 / 3),
    "wrnc16plain": (128, 0.1, 400, 5e-4, 1 / 3),
    "sres18": (256, 0.1, 100, 1e-4, 1.0),
    "sres34": (256, 0.1, 100, 1e-4, 1.0),
    "sres50": (256, 0.1, 100, 1e-4, 1.0),
}


@pytest.mark.parametrize("arch", sorted(ORIGINAL))
def test_recipes_reproduce_the_original_settings(arch):
    r = RECIPES[arch]
    assert (r.batch_size, r.lr, r.epochs, r.weight_decay) == ORIGINAL[arch][:4]
    assert r.gamma_init == pytest.approx(ORIGINAL[arch][4])
    # common to all: SGD momentum 0.9, no warmup, wd on BN/bias too, bias lr x2, no smoothing
    assert (r.momentum, r.warmup_epochs, r.bias_lr_factor, r.label_smoothing) == (0.9, 0.0, 2.0, 0.0)
    assert r.effective_weight_decay_bias() == r.weight_decay


def test_every_arch_has_a_recipe_for_its_own_dataset():
    assert set(list_recipes()) == set(constructor.list_archs())
    for arch in constructor.list_archs():
        spec = constructor.get_arch_spec(arch)
        assert spec.recipe_name == arch and RECIPES[spec.recipe_name].dataset == spec.dataset


def test_overrides_and_their_validation():
    r = get_recipe("src56", epochs=3, lr=0.05, batch_size=None)
    assert (r.epochs, r.lr, r.batch_size) == (3, 0.05, 128)
    assert RECIPES["src56"].epochs == 400  # the table itself is untouched
    with pytest.raises(ValueError, match="no training recipe for arch 'nope'.*src56"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="unknown recipe field.*'learning_rate'"):
        get_recipe("src56", learning_rate=0.1)
    for field, value, rule in [("lr", 0.0, "> 0"), ("epochs", 0, ">= 1"), ("batch_size", -8, ">= 1"),
                               ("weight_decay", -1e-4, ">= 0"), ("label_smoothing", 1.0, r"in \[0, 1\)"),
                               ("warmup_epochs", 5, r"in \[0, epochs=5\)")]:
        kwargs = {field: value, "epochs": 5} if field != "epochs" else {field: value}
        with pytest.raises(ValueError, match=f"{field} must be {rule}, got {value!r}"):
            get_recipe("src56", **kwargs)


def test_validation_schedule_every_n_epochs_dense_tail_and_last():
    r = get_recipe("cfqkbnc", epochs=30, val_every=5, val_tail_epochs=3)
    evaluated = [e + 1 for e in range(r.epochs) if should_validate(r, e)]
    assert evaluated == [5, 10, 15, 20, 25, 28, 29, 30]
    short = get_recipe("cfqkbnc", epochs=2, val_every=5, val_tail_epochs=0)
    assert [e for e in range(2) if should_validate(short, e)] == [1]


def test_recipe_round_trips_through_its_dict():
    from train_configs import Recipe

    r = get_recipe("sres50", warmup_epochs=5, label_smoothing=0.1)
    assert Recipe(**r.to_dict()) == r
