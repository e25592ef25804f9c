"""One task's training pieces against NumPy: the batch loss of DESIGN.md §2, the lr schedule, the
data order and the pseudo-class cycling."""

import jax
import numpy as np
import pytest

from calfuse_jax import calibration, methods, sharding, train
from calfuse_jax.config import method_config

D, C = 8, 6


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _setup(kd_weight=0.5):
    # A linear gate schedule over 3 tasks (0 -> 0.5) exercises the calibration and the task
    # context: g = 0.25 on task 1, and the teacher, in task 0's context, g = 0. Zero Cholesky
    # factors make every pseudo-feature equal to its class mean, so the NumPy reference needs no
    # random numbers.
    config = method_config()
    config.calibration.update(mode="schedule", schedule="linear", g_first=0.0, g_last=0.5)
    config.pseudo.beta = 0.2  # floor(10 * 0.2) = 2 pseudo samples, floor(20 * 0.2) = 4 hard
    config.loss.kd_weight = kd_weight
    head = methods.make_head(config, D)
    settings = methods.step_settings(config, logit_scale=10.0)
    rng = np.random.default_rng(0)
    ctx = calibration.task_context([0, 3, 5, 6], 1)  # 3 old classes, 5 seen; class 5 unseen
    params = head.init(jax.random.PRNGKey(0), np.zeros((1, D), np.float32), ctx)["params"]
    teacher = head.init(jax.random.PRNGKey(1), np.zeros((1, D), np.float32), ctx)["params"]
    inputs = methods.TaskInputs(
        text=_unit(rng.standard_normal((C, D))).astype(np.float32),
        ctx=ctx,  # class 5 is not seen yet: the softmax must ignore it
        means=(3 * rng.standard_normal((C, D))).astype(np.float32),
        chols=np.zeros((C, D, D), np.float32),
        pairs=np.array([[1, 4], [2, 3], [0, 0]], np.int32),  # last row is padding
        pair_mask=np.array([1, 1, 0], np.float32),
        teacher=teacher,
        teacher_ctx=calibration.task_context([0, 3, 5, 6], 0),
        floats=methods.step_floats(config),
    )
    features = (3 * rng.standard_normal((5, D))).astype(np.float32)
    labels = np.array([3, 4, 3, 4, 0], np.int32)
    mask = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is batch padding
    return head, settings, params, inputs, (features, labels, mask)


def _numpy_logits(params, f0, text, gate, scale, num_seen):
    fa = f0 @ np.asarray(params["adapter"]["kernel"])
    f = _unit(gate * _unit(f0) + (1 - gate) * _unit(fa))
    logits = scale * f @ text.T
    logits[:, num_seen:] = -np.inf
    return logits, f


def numpy_loss(params, inputs, batch, pseudo_ids, kd_weight, hinge_on=True):
    """DESIGN.md §2 written out in NumPy for zero covariances (pseudo-feature = class mean)."""
    features, labels, mask = batch
    text, means = np.asarray(inputs.text), np.asarray(inputs.means)
    pseudo_labels = np.repeat(pseudo_ids, 2)
    x = np.concatenate([features[mask > 0], means[pseudo_labels]])
    y = np.concatenate([labels[mask > 0], pseudo_labels])
    logits, _ = _numpy_logits(params, x, text, 0.25, 10.0, 5)
    ce = -np.mean(_log_softmax(logits)[np.arange(len(y)), y])
    hinge = 0.0
    if hinge_on:
        pairs = np.asarray(inputs.pairs)[:2]
        hard = means[np.repeat(pairs[:, 0], 4)]
        _, f = _numpy_logits(params, hard, text, 0.25, 10.0, 5)
        own, other = text[np.repeat(pairs[:, 0], 4)], text[np.repeat(pairs[:, 1], 4)]
        hinge = np.mean(np.maximum((f * other).sum(1) - (f * own).sum(1) + 0.1, 0))
    student, _ = _numpy_logits(params, means[pseudo_labels], text, 0.25, 10.0, 3)
    teacher, _ = _numpy_logits(inputs.teacher, means[pseudo_labels], text, 0.0, 10.0, 3)
    log_s, log_t = _log_softmax(student[:, :3] / 2.0), _log_softmax(teacher[:, :3] / 2.0)
    kd = 4.0 * np.mean((np.exp(log_t) * (log_t - log_s)).sum(1))
    return ce + hinge + kd_weight * kd


# One jitted function for both loss tests (same static settings): one compile.
jitted_loss = jax.jit(methods.loss_fn, static_argnums=(5, 6))


def test_loss_matches_numpy():
    head, settings, params, inputs, batch = _setup()
    pseudo_ids = np.array([2, 0], np.int32)
    loss, terms = jitted_loss(
        params, batch, pseudo_ids, jax.random.PRNGKey(3), inputs, head, settings
    )
    assert set(terms) == {"ce", "hinge", "kd"}
    expected = numpy_loss(params, inputs, batch, pseudo_ids, kd_weight=0.5)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_a_run_without_hard_pairs_draws_no_hinge_rows():
    # P = 0 (no task of the run has a pair): the step skips the hinge's samples and term instead
    # of drawing rows for a padded, masked pair; the rest of the loss is unchanged.
    head, settings, params, inputs, batch = _setup()
    inputs = inputs._replace(pairs=np.zeros((0, 2), np.int32), pair_mask=np.zeros(0, np.float32))
    pseudo_ids = np.array([2, 0], np.int32)
    loss, terms = jax.jit(methods.loss_fn, static_argnums=(5, 6))(
        params, batch, pseudo_ids, jax.random.PRNGKey(3), inputs, head, settings
    )
    assert set(terms) == {"ce", "kd"}
    expected = numpy_loss(params, inputs, batch, pseudo_ids, kd_weight=0.5, hinge_on=False)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_first_task_switches_old_class_terms_off():
    head, settings, params, inputs, batch = _setup()
    inputs = inputs._replace(ctx=inputs.ctx._replace(num_old=np.int32(0)))
    key = jax.random.PRNGKey(3)
    _, terms = jitted_loss(params, batch, np.zeros(2, np.int32), key, inputs, head, settings)
    features, labels, mask = batch
    logits, _ = _numpy_logits(params, features[:4], np.asarray(inputs.text), 0.25, 10.0, 5)
    ce = -np.mean(_log_softmax(logits)[np.arange(4), labels[:4]])
    np.testing.assert_allclose(float(terms["ce"]), ce, rtol=2e-5)  # real rows only
    assert float(terms["hinge"]) == 0.0 and float(terms["kd"]) == 0.0


def test_learning_rate_schedule():
    config = method_config()  # lr 1e-3, x0.1 at epochs 4 and 10
    schedule = train.lr_schedule(config)
    lrs = [float(schedule(epoch)) for epoch in (0, 3, 4, 9, 10, 14)]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)
    config.train.milestones = (4, 4)  # listed twice: decays twice, as lr * decay ** count
    assert float(train.lr_schedule(config)(4)) == pytest.approx(1e-5)


def test_epoch_order_is_seeded_and_reshuffled_and_keeps_padding_last():
    _, order_key, _ = train.task_keys(jax.random.PRNGKey(0))
    a = np.asarray(train.epoch_order(order_key, 0, 50, 64))
    np.testing.assert_array_equal(a, train.epoch_order(order_key, 0, 50, 64))
    assert sorted(a[:50]) == list(range(50)) and list(a[50:]) == list(range(50, 64))
    assert not np.array_equal(a, train.epoch_order(order_key, 1, 50, 64))
    other = train.task_keys(jax.random.PRNGKey(1))[1]
    assert not np.array_equal(a, train.epoch_order(other, 0, 50, 64))


def test_pseudo_classes_cycle_through_every_old_class_each_epoch():
    _, _, key = train.task_keys(jax.random.PRNGKey(0))
    first = np.asarray(train.pseudo_class_schedule(key, 0, 7, steps=10, per_batch=2, classes=12))
    second = np.asarray(train.pseudo_class_schedule(key, 1, 7, steps=10, per_batch=2, classes=12))
    assert first.shape == (10, 2)
    # ceil(7 / 2) = 4 batches visit every old class once (the 8th slot starts the next cycle).
    assert sorted(first.reshape(-1)[:7]) == list(range(7))
    np.testing.assert_array_equal(first.reshape(-1)[7:14], first.reshape(-1)[:7])
    assert not np.array_equal(first, second)  # reshuffled every epoch
    none = train.pseudo_class_schedule(key, 0, 0, steps=3, per_batch=0, classes=12)
    np.testing.assert_array_equal(none, np.zeros((3, 1)))  # task 0: no old class


def test_host_batch_pads_and_masks():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.arange(6)
    x, y, mask = train.host_batch(features, labels, np.array([4, 1]), padded=4)
    np.testing.assert_array_equal(x, [[8, 9], [2, 3], [0, 0], [0, 0]])
    np.testing.assert_array_equal(y, [4, 1, 0, 0])
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])


def _task(mesh, features, labels, kd_weight=0.0):
    head, settings, params, inputs, _ = _setup(kd_weight=kd_weight)
    key, inputs = sharding.replicate((jax.random.PRNGKey(0), inputs), mesh)
    capacity = sharding.padded_size(20, mesh)  # more slots than rows, as a smaller task has
    view = train.TaskView(1, 3, features, labels, capacity, key, inputs)
    state = sharding.replicate(train.TrainState(params, train.optimizer().init(params)), mesh)
    method = methods.CalibratedHeadMethod(head, settings, fusion_rules=(), trains=True)
    return method, view, state


def _host_replay(method, config, view, state):
    """The same task, one jitted step at a time from the host, each batch built with NumPy
    from the same orders: what the device's epoch program must reproduce."""
    batch_size, epochs = config.train.batch_size, config.train.epochs
    steps = train.steps_per_epoch(len(view.labels), batch_size)
    step_key, order_key, pseudo_key = train.task_keys(view.key)
    step_fn = jax.jit(train._train_step, static_argnames="method")
    losses = []
    for epoch in range(epochs):
        order = np.asarray(train.epoch_order(order_key, epoch, len(view.labels), view.capacity))
        pseudo = train.pseudo_class_schedule(pseudo_key, epoch, 3, steps, 2, C)
        lr = train.lr_schedule(config)(epoch)
        for index in range(steps):
            rows = order[index * batch_size : (index + 1) * batch_size]
            rows = rows[rows < len(view.labels)]
            batch = train.host_batch(view.features, view.labels, rows, batch_size)
            step = epoch * steps + index
            state, loss = step_fn(state, batch, pseudo[index], step, lr, step_key, view.inputs,
                                  method=method)  # fmt: skip
            losses.append(float(loss))
    return state, losses


def test_train_task_runs_every_row_as_the_host_replay_and_flags_nan():
    config = method_config()
    config.train.update(epochs=2, batch_size=6, milestones=(1,))
    config.pseudo.classes_per_batch = 2
    mesh = sharding.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(1)
    features = (3 * rng.standard_normal((15, D))).astype(np.float32)
    labels = rng.integers(3, 5, 15).astype(np.int32)
    method, view, state = _task(mesh, features, labels)
    expected, expected_losses = _host_replay(method, config, view, state)
    method, view, state = _task(mesh, features, labels)
    seen, reported = [], []
    state, info = train.train_task(
        method, config, view, state, mesh, progress=False,
        step_callback=lambda t, s: seen.append(s),
        loss_callback=lambda t, steps, losses, lrs: reported.append((steps, losses, lrs)),
    )  # fmt: skip
    assert info["steps"] == 6 and seen == [3, 6]  # ceil(15 / 6) = 3 steps per epoch
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([r[1] for r in reported]), expected_losses, 1e-6)
    assert info["loss"] == pytest.approx(np.mean(expected_losses[3:]), rel=1e-6)
    np.testing.assert_array_equal(np.concatenate([r[0] for r in reported]), np.arange(1, 7))
    np.testing.assert_allclose(np.concatenate([r[2] for r in reported]), [1e-3] * 3 + [1e-4] * 3)
    bad = view._replace(features=features * np.inf)
    method, _, state = _task(mesh, features, labels)
    with pytest.raises(train.NonFiniteLossError, match="task 1, step 1"):
        train.train_task(method, config, bad, state, mesh, progress=False)


def test_progress_bar_names_the_task_as_the_log_and_leaves_the_compile_out_of_its_rate(
    monkeypatch, capsys
):
    import re
    import time

    config = method_config()
    config.train.update(epochs=4, batch_size=6, milestones=())
    mesh = sharding.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(1)
    features = (3 * rng.standard_normal((15, D))).astype(np.float32)
    method, view, state = _task(mesh, features, rng.integers(3, 5, 15).astype(np.int32))
    compiled = train.epoch_fn
    calls = []

    def slow_first_epoch(*args, **kwargs):
        run_epoch = compiled(*args, **kwargs)

        def timed(*inputs):
            time.sleep(1.5 if not calls else 0.02)  # a 1.5 s "compile", then fast epochs
            calls.append(1)
            return run_epoch(*inputs)

        return timed

    monkeypatch.setattr(train, "epoch_fn", slow_first_epoch)
    train.train_task(method, config, view, state, mesh, progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    assert final.startswith("task 1 (2/3): 100%"), final
    # 9 steps after the first epoch in ~0.1 s: far above the 12 / 1.6 s with the compile in.
    rate = float(re.search(r"([\d.]+)it/s", final)[1])
    assert rate > 30, final
