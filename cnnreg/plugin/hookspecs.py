"""Every hook cnnreg calls, as empty functions with their contracts.

Two families, one prefix (``cnnreg_``), one marker (:data:`hookimpl`):

* Registration hooks return ``{name: factory}``. Every plugin's answer is
  kept (none is ``firstresult``), so one plugin can never silently shadow
  another: a name registered twice is an error that names both plugins, and a
  recipe picks one with ``plugin:name``. A factory is a typed function; its
  signature *is* its parameter schema. Parameters without a default are
  required in recipes; the first line of its docstring is its summary in
  ``cnnreg ls`` and an ``Args:`` section describes each parameter.

* Run events receive frozen records and return ``None``. A recipe's callbacks
  are objects registered on a plugin manager that lives for one run, so a
  callback implements exactly the events it cares about, by name.

Some parameter names have a meaning of their own (see ``cnnreg.plugin.catalog``):
``num_classes`` and ``in_channels`` (models, losses, metrics) and ``epochs``
and ``steps_per_epoch`` (schedulers) are filled from the run when the recipe
leaves them out; live objects are passed to optimizers (``params``) and
schedulers (``optimizer``); and a parameter annotated
:class:`cnnreg.core.data.DataContext` receives the run's data context (image size,
statistics, the pretrained model's preprocessing) and is not a recipe key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from cnnreg.core.run import Run
    from cnnreg.core.records import EpochRecord, FitResult, ProgressRecord

hookspec = pluggy.HookspecMarker("cnnreg")
hookimpl = pluggy.HookimplMarker("cnnreg")

Factories = dict[str, Callable[..., Any]]


# -- registration ------------------------------------------------------------


@hookspec
def cnnreg_models() -> Factories:
    """Register model factories.

    Called once when a catalog is built (``cnnreg ls``, loading a recipe).

    :returns: ``{name: factory}``; each factory returns a ``torch.nn.Module``
        that maps a float batch ``[B, C, H, W]`` to logits ``[B, num_classes]``.
        ``num_classes`` and ``in_channels`` parameters are filled from the
        dataset unless the recipe sets them. A module may carry
        ``cnnreg_data_config`` (input size, mean, std, interpolation, crop
        fraction) so the data follows a pretrained backbone, and
        ``cnnreg_param_groups()`` to give parts of it their own
        learning-rate multiplier (``lr_mult``). A module that wraps a
        library's network names it as ``cnnreg_weights_module``: weights
        files (best.safetensors, ``cnnreg export --format safetensors``)
        then hold that network's own keys, and ``cnnreg_weights_metadata``
        (strings) says how to rebuild it; without one, the files say which
        factory and parameters built the model.
    """


@hookspec
def cnnreg_datasets() -> Factories:
    """Register dataset factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory returns a
        :class:`cnnreg.core.data.DataSource`: the splits it has (train, and val or
        test when the source defines them), the class names, the image size
        and channels, and optionally the per-channel mean and std.

    A factory that raises :class:`cnnreg.core.errors.Unavailable` (or
    ``FileNotFoundError``) when its files are not there lets ``cnnreg
    validate`` check the rest of a recipe without them. One decorated with
    :func:`cnnreg.core.data.describes` is only described by validate (and by the
    run before it loads): its ``DatasetInfo`` may say that the images differ
    in size (the run then picks the factory's ``size`` parameter from the
    model's preprocessing), give the splits' labels (validation splits,
    subsets and folds are then carved exactly), and the folders whose whole
    tree is read (the run's output must not go inside them).
    """


@hookspec
def cnnreg_transforms() -> Factories:
    """Register batch transform factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory returns a callable that maps a
        float batch ``[B, C, H, W]`` on the run's device to a float batch,
        drawing any randomness per sample from torch's generator on that
        device. A factory that takes a :class:`cnnreg.core.data.DataContext` can
        default its sizes and statistics to the dataset's, or to the
        pretrained model's own preprocessing.
    """


@hookspec
def cnnreg_losses() -> Factories:
    """Register loss factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory returns a callable
        ``loss(logits, targets) -> scalar tensor``.
    """


@hookspec
def cnnreg_optimizers() -> Factories:
    """Register optimizer factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory takes ``params`` (a list of
        parameter-group dicts, which may carry ``lr_mult``) plus its own
        options, and returns a ``torch.optim.Optimizer``.
    """


@hookspec
def cnnreg_schedulers() -> Factories:
    """Register learning-rate scheduler factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory takes ``optimizer`` plus its
        own options (``epochs`` and ``steps_per_epoch`` are filled in) and
        returns a :class:`cnnreg.core.records.Schedule`: the torch scheduler, whether
        it steps per ``"epoch"`` or per ``"step"``, and the metric it reads, if
        any (ReduceLROnPlateau).
    """


@hookspec
def cnnreg_metrics() -> Factories:
    """Register metric factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory returns a
        :class:`cnnreg.core.records.Metric` whose state lives on the device, is
        updated every batch without a host synchronisation and is read once
        per epoch.
    """


@hookspec
def cnnreg_callbacks() -> Factories:
    """Register callback factories.

    Called once when a catalog is built.

    :returns: ``{name: factory}``; each factory returns an object with
        ``@hookimpl`` methods for the run events it handles. It is registered
        on the run's own plugin manager for the duration of one run. An object
        with ``state_dict()``/``load_state_dict()`` has its state saved in
        resumable checkpoints. A string attribute ``monitor`` is checked
        against the metrics the run reports before training starts; with
        ``chooses_best = True`` too (the checkpoint callback) it becomes the
        run's monitor unless ``trainer.monitor`` is set.
    """


# -- per-run plugins -------------------------------------------------------------


@hookspec
def cnnreg_run_plugins(run: Run) -> list[object]:
    """Return objects to register on ``run``'s plugin manager for this run.

    Called once by :func:`cnnreg.build`, after the run is assembled. This is
    how a globally installed plugin (the rich progress display, a tracker)
    keeps state that belongs to one run without module globals.

    :param run: the assembled run.
    :returns: a list of plugin objects (possibly empty).
    """


# -- run events ----------------------------------------------------------------


@hookspec
def cnnreg_fit_start(run: Run, start_epoch: int) -> None:
    """Called once before the first epoch of :func:`cnnreg.fit`.

    :param run: the assembled run (recipe, device, model, optimizer, data).
    :param start_epoch: the first epoch that will run, 1-based; greater than 1
        when a run resumes.
    """


@hookspec
def cnnreg_epoch_start(run: Run, epoch: int) -> None:
    """Called before each training epoch.

    :param run: the run.
    :param epoch: the epoch about to run, 1-based.
    """


@hookspec
def cnnreg_train_progress(run: Run, progress: ProgressRecord) -> None:
    """Called during an epoch, at most a few times a second.

    The engine never synchronises with the device to serve this hook: the
    loss it carries is the latest one the device has already finished, or
    ``None`` when none has finished yet.

    :param run: the run.
    :param progress: epoch, step, steps per epoch, images seen, elapsed time
        and the latest finished loss.
    """


@hookspec
def cnnreg_optimizer_step(run: Run, epoch: int, step: int, total_steps: int) -> None:
    """Called after every optimizer step, only when some plugin implements it.

    For work that must follow the weights step by step (a moving average of
    the weights, lookahead). It runs inside the training loop: queue device
    work, never read a tensor back to the host here.

    :param run: the run.
    :param epoch: the current epoch, 1-based.
    :param step: optimizer steps taken since training began, this one included
        (1-based, counted across epochs and resumes).
    :param total_steps: the optimizer steps the whole run takes.
    """


@hookspec
def cnnreg_evaluate_start(run: Run, split: str) -> None:
    """Called before the model is evaluated on a split (``val`` each epoch, or any split
    through :func:`cnnreg.evaluate`).

    A plugin may put other weights in the model here (an average of the
    weights); it puts the training weights back in :func:`cnnreg_epoch_start`.

    :param run: the run.
    :param split: ``train``, ``val`` or ``test``.
    """


@hookspec
def cnnreg_epoch_end(run: Run, record: EpochRecord) -> None:
    """Called after each epoch's training and evaluation.

    Callbacks save checkpoints and write logs here.

    :param run: the run; its model and optimizer hold the state after
        ``record.epoch``.
    :param record: the epoch's metrics, read from the device once.
    """


@hookspec
def cnnreg_should_stop(run: Run, record: EpochRecord) -> str | None:
    """Asked after :func:`cnnreg_epoch_end` whether training should stop.

    :param run: the run.
    :param record: the epoch's metrics.
    :returns: a reason to stop (shown to the user and kept in the summary),
        or ``None`` to go on. Training stops if any plugin gives a reason.
    """


@hookspec
def cnnreg_fit_end(run: Run, result: FitResult) -> None:
    """Called once after training stops, for whatever reason.

    :param run: the run.
    :param result: every epoch's record, the best epoch, why it stopped and
        how long it took.
    """
