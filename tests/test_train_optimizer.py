"""The optimizer, schedule, parameter groups and training configs against docs/design.md §6/§9."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from deris_jax import losses
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.train import optimizer as opt_lib
from deris_jax.train import params as params_lib
from deris_jax.train import schedule as sched_lib
from deris_jax.train import state as state_lib

VARIANTS = ("deris_b_refcoco", "deris_l_refcoco", "deris_b_grefcoco", "deris_l_grefcoco")

# PyTorch 2.13: torch.optim.Adam(amsgrad=True, betas=(0.9, 0.98), eps=1e-9, weight_decay=0),
# two param groups (lr 1e-4 and 5e-5), the lr of step t scaled by FACTORS[t], each step after
# torch.nn.utils.clip_grad_norm_([w, b], 0.15) of the gradients `_grads(t)`. Per step:
# (total norm returned by clip_grad_norm_, w, b) after optimizer.step().
W0 = [[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]]
B0 = [0.1, -0.2, 0.3]
FACTORS = [0.5, 0.5, 1.0, 1.0, 0.1]
TORCH_STEPS = [
    [5.820597171783447,
     [[0.5, -1.0000499486923218, 0.24995000660419464],
      [1.9999500513076782, 5.000000601285137e-05, -0.7499499917030334]],
     [0.09997500479221344, -0.20002500712871552, 0.2999750077724457]],
    [1.8464617729187012,
     [[0.4999629557132721, -1.0000836849212646, 0.24991661310195923],
      [1.999918818473816, 8.381965744774789e-05, -0.7499165534973145]],
     [0.09995053708553314, -0.2000310868024826, 0.29999226331710815]],
    [5.774030685424805,
     [[0.49989914894104004, -1.0001462697982788, 0.24991796910762787],
      [1.9999744892120361, 0.0001558940566610545, -0.7499101161956787]],
     [0.09992003440856934, -0.2000143975019455, 0.3000292479991913]],
    [0.017374329268932343,
     [[0.4998460114002228, -1.0001906156539917, 0.24992512166500092],
      [2.0000219345092773, 0.00020848840358667076, -0.7499112486839294]],
     [0.09989545494318008, -0.20000042021274567, 0.3000594675540924]],
    [5.32503080368042,
     [[0.49984627962112427, -1.0001887083053589, 0.2499270737171173],
      [2.0000219345092773, 0.0002067804744001478, -0.7499133348464966]],
     [0.09989339113235474, -0.19999924302101135, 0.30006200075149536]],
]


def _grads(t):
  gw = np.sin(np.arange(6, dtype=np.float32).reshape(2, 3) + t) * (3.0 if t % 2 == 0 else 0.01)
  gb = np.cos(np.arange(3, dtype=np.float32) * 0.7 + t) * (2.0 if t < 3 else 0.001)
  return {"decoder": {"w": jnp.asarray(gw, jnp.float32)},
          "beit3": {"b": jnp.asarray(gb, jnp.float32)}}


def _run(tx, steps=5, norm_given=False):
  """`norm_given`: pass the gradients' norm to the update, as the train step does."""
  params = {"decoder": {"w": jnp.asarray(W0, jnp.float32)},
            "beit3": {"b": jnp.asarray(B0, jnp.float32)}}
  state = tx.init(params)
  out = []
  for t in range(steps):
    grads = _grads(t)
    extra = dict(grad_norm=opt_lib.global_norm(grads)) if norm_given else {}
    updates, state = tx.update(grads, state, params, steps_per_epoch=jnp.int32(1), **extra)
    params = optax.apply_updates(params, updates)
    out.append((float(opt_lib.global_norm(grads)), np.asarray(params["decoder"]["w"]),
                np.asarray(params["beit3"]["b"])))
  return out


def _opt_config():
  config = common.optimizer_config()
  config.frozen = ()
  return config


@pytest.mark.parametrize("norm_given", [False, True])
def test_optimizer_reproduces_pytorch_adam_amsgrad_with_clipping_and_groups(norm_given):
  factors = jnp.asarray(FACTORS, jnp.float32)
  schedule = lambda step, steps_per_epoch: 1e-4 * factors[step // steps_per_epoch]  # noqa: E731
  params = {"decoder": {"w": jnp.zeros((2, 3))}, "beit3": {"b": jnp.zeros((3,))}}
  got = _run(opt_lib.build_optimizer(_opt_config(), schedule, params), norm_given=norm_given)
  for t, ((norm, w, b), (want_norm, want_w, want_b)) in enumerate(zip(got, TORCH_STEPS)):
    np.testing.assert_allclose(norm, want_norm, rtol=1e-6, err_msg=f"step {t} grad norm")
    np.testing.assert_allclose(w, want_w, rtol=2e-7, atol=1e-9, err_msg=f"step {t} w (lr x1)")
    np.testing.assert_allclose(b, want_b, rtol=2e-7, atol=1e-9, err_msg=f"step {t} b (x0.5)")


def _norm_tree():
  rng = np.random.default_rng(0)
  return {"a": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(3,)) * 100, jnp.bfloat16),
                "d": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)},
          "e": jnp.asarray(2.5, jnp.float32)}


@pytest.mark.parametrize("joined", ["none", "all", "some"])
def test_global_norm_is_the_same_with_leaves_concatenated_or_not(joined):
  tree = _norm_tree()
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  concatenated = {"none": None,
                  "all": jax.tree.map(lambda _: True, tree),
                  "some": {"a": True, "b": {"c": False, "d": True}, "e": False}}[joined]
  got = jax.jit(lambda t: opt_lib.global_norm(t, concatenated))(tree)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(opt_lib.global_norm({}, {})) == 0.0


def test_global_norm_does_not_gather_sharded_leaves():
  """The train step joins the replicated leaves only: a concatenation of sharded ones would
  gather them on every device."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  specs = {"a": P("fsdp", None), "b": P(None, "fsdp"), "c": P(), "d": P()}
  rng = np.random.default_rng(1)
  tree = {name: jax.device_put(rng.normal(size=(16, 8)).astype(np.float32),
                               NamedSharding(mesh, spec)) for name, spec in specs.items()}
  replicated = jax.tree.map(lambda x: x.sharding.is_fully_replicated, tree)
  assert replicated == {"a": False, "b": False, "c": True, "d": True}
  compiled = jax.jit(lambda t: opt_lib.global_norm(t, replicated)).lower(tree).compile()
  assert "all-gather" not in compiled.as_text()
  every_leaf = jax.tree.map(lambda _: True, replicated)
  assert "all-gather" in jax.jit(lambda t: opt_lib.global_norm(t, every_leaf)).lower(
      tree).compile().as_text()  # what joining the sharded leaves would cost
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values()))
  np.testing.assert_allclose(float(compiled(tree)), want, rtol=1e-6)


def test_the_clip_uses_the_norm_it_is_given():
  grads = _grads(0)
  clip = opt_lib.clip_by_global_norm_torch(0.15)
  own, _ = clip.update(grads, clip.init(grads))
  given, _ = clip.update(grads, clip.init(grads), grad_norm=opt_lib.global_norm(grads))
  doubled, _ = clip.update(grads, clip.init(grads), grad_norm=2 * opt_lib.global_norm(grads))
  for name, value in trees.named_leaves(own).items():
    np.testing.assert_array_equal(trees.named_leaves(given)[name], value)
    np.testing.assert_allclose(trees.named_leaves(doubled)[name], value / 2, rtol=1e-5)


def test_optax_amsgrad_is_not_the_pytorch_rule():
  """Why the optimizer is hand-written: optax's amsgrad maxes bias-corrected moments."""
  factors = jnp.asarray(FACTORS, jnp.float32)
  tx = optax.chain(optax.clip_by_global_norm(0.15),
                   optax.amsgrad(lambda step: 1e-4 * factors[step], b1=0.9, b2=0.98, eps=1e-9))
  got = _run(tx)
  diff = max(np.max(np.abs(w - np.asarray(want_w)))
             for (_, w, _), (_, want_w, _) in zip(got, TORCH_STEPS))
  assert diff > 1e-6  # the hand-written rule above matches to ~1e-9


def test_frozen_parameters_get_no_optimizer_state_and_groups_follow_the_rules():
  params = {"swin": {"a": jnp.ones((2,))}, "beit3": {"x": {"0": jnp.ones((3,))}},
            "pixel_decoder": {"k": jnp.ones((4,))}}
  config = common.optimizer_config()
  trainable, frozen = params_lib.split_frozen(params, config.frozen)
  assert trees.named_leaves(frozen).keys() == {"swin.a"}
  assert params_lib.merge_trees(trainable, frozen) == params
  state = opt_lib.build_optimizer(config, lambda s: 1e-4, trainable).init(trainable)
  assert not any("swin" in name for name in trees.named_leaves(state))
  assert opt_lib.param_groups(params, config) == {
      "swin.a": "frozen", "beit3.x.0": "lr x0.5", "pixel_decoder.k": "lr x1"}


def test_param_groups_of_deris_b_match_the_reference_counts():
  """§9 groups with the §1 measured sizes: BEiT-3 220.99 M at lr/2, Swin 48.84 M frozen."""
  config = load_config("configs/deris_b_refcoco.py")
  abstract = jax.eval_shape(state_lib.init_params_fn(config.model), jax.random.key(0))
  sizes = {name: int(np.prod(leaf.shape)) for name, leaf in trees.named_leaves(abstract).items()}
  totals = {}
  for name, group in opt_lib.param_groups(abstract, config.optimizer).items():
    totals[group] = totals.get(group, 0) + sizes[name]
  assert set(totals) == {"frozen", "lr x0.5", "lr x1"}
  assert abs(totals["lr x0.5"] / 1e6 - 220.99) < 0.005
  assert abs(totals["frozen"] / 1e6 - 48.84) < 0.005
  assert all(g == "frozen" for n, g in opt_lib.param_groups(abstract, config.optimizer).items()
             if n.startswith("swin."))
  # The rest (pixel decoder, predictor, projections, aligner, queries) trains at lr x1; it is
  # 0.14 M smaller than §1's 21.63 M because never-called official modules are not built
  # (deris_jax.convert.deris_keys.DROPS).
  assert 21.4 < totals["lr x1"] / 1e6 < 21.63


def test_schedules_match_the_official_epoch_factors():
  refcoco = load_config("configs/deris_b_refcoco.py")
  want = [0.5] + [1.0] * 13 + [0.1] * 4 + [0.01] * 2  # §9: warmup 1, decay at 15 and 19
  np.testing.assert_allclose(sched_lib.epoch_factors(refcoco.schedule, 20), want, rtol=1e-6)
  grefcoco = load_config("configs/deris_b_grefcoco.py")
  np.testing.assert_allclose(sched_lib.epoch_factors(grefcoco.schedule, 6),
                             [1.0] * 5 + [0.1], rtol=1e-6)  # §9: 1e-4 then 1e-5 in epoch 5
  linear = common.schedule_config(warmup_epochs=1, decay_epochs=(), name="linear_warmup")
  np.testing.assert_allclose(sched_lib.epoch_factors(linear, 4), [0.5, 1.0, 2 / 3, 1 / 3],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
    sched_lib.epoch_factor(common.schedule_config(warmup_epochs=0, decay_epochs=(),
                                                  name="cosine"), 0, 1)


def test_lr_is_constant_within_an_epoch():
  config = load_config("configs/deris_b_refcoco.py")
  lr = sched_lib.make_lr_schedule(1e-4, config.schedule, epochs=20)
  got = np.asarray([lr(jnp.int32(s), 3) for s in (0, 2, 3, 41, 42, 59, 60, 1000)])
  np.testing.assert_allclose(got, [5e-5, 5e-5, 1e-4, 1e-4, 1e-5, 1e-6, 1e-6, 1e-6], rtol=1e-6)


def test_steps_per_epoch_is_a_value_of_one_program():
  # The train step reads steps per epoch from its state: one traced schedule for any dataset.
  config = load_config("configs/deris_b_refcoco.py")
  lr = jax.jit(sched_lib.make_lr_schedule(1e-4, config.schedule, epochs=20))
  for spe, step, want in ((3, 3, 1e-4), (3, 42, 1e-5), (7, 6, 5e-5), (7, 7, 1e-4),
                          (1, 13, 1e-4), (1, 14, 1e-5), (1, 18, 1e-6)):
    np.testing.assert_allclose(lr(jnp.int32(step), jnp.int32(spe)), want, rtol=1e-6,
                               err_msg=f"step {step}, {spe} steps per epoch")
  assert lr._cache_size() == 1


def test_the_learning_rate_transform_needs_the_steps_per_epoch():
  config = load_config("configs/deris_b_refcoco.py")
  schedule = sched_lib.make_lr_schedule(1e-4, config.schedule, epochs=20)
  params = {"w": jnp.ones((2,))}
  tx = opt_lib.build_optimizer(config.optimizer, schedule, params)
  state = tx.init(params)
  with pytest.raises(TypeError, match="needs update\\(..., steps_per_epoch=N\\)"):
    tx.update(params, state, params)
  updates, _ = tx.update(params, state, params, steps_per_epoch=jnp.int32(5))
  assert np.all(np.asarray(updates["w"]) < 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_configs_carry_the_reference_recipe(variant):
  config = load_config(f"configs/{variant}.py")
  opt = config.optimizer
  assert (opt.name, opt.lr, opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.amsgrad,
          opt.clip_norm) == ("adam", 1e-4, 0.9, 0.98, 1e-9, 0.0, True, 0.15)  # §9
  assert tuple(opt.lr_multipliers) == ((r"^beit3\.", 0.5),)
  assert config.train.seed == 6666
  refcoco = "refcoco" in variant and "grefcoco" not in variant
  assert config.train.epochs == (20 if refcoco else 6)
  assert tuple(config.schedule.decay_epochs) == ((15, 19) if refcoco else (6,))
  assert config.schedule.warmup_epochs == (1 if refcoco else 0)
  assert config.data.name == ("refcoco_mixed" if refcoco else "grefcoco")
  assert config.eval.splits == tuple(config.data.eval_splits)
  loss = config.loss.to_dict()
  # The official 4-GPU DDP objective, with the sampler's per-GPU groups (one linked value).
  assert (loss.pop("normalizer"), loss.pop("official_world_size")) == ("official", 4)
  assert config.data.official_world_size == 4
  assert config.data.batch_size == (64 if refcoco else 4)  # §9: 16 / 1 per GPU x 4
  default = losses.default_loss_config().to_dict()
  del default["normalizer"], default["official_world_size"]
  assert loss == default  # §6
  state_lib.frozen_patterns(config)  # consistent with model.freeze_swin


def test_frozen_rules_must_agree_with_the_model():
  config = load_config("configs/deris_micro.py")
  config.optimizer.frozen = ()
  with pytest.raises(ValueError, match="freeze_swin=True.*trains the Swin"):
    state_lib.frozen_patterns(config)
