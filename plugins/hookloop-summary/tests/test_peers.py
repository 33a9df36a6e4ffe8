"""The behaviours of Lightning's ModelSummary tests, on hookloop's Summary plugin and
``summarize``. Each test names the peer test it ports; where hookloop differs on purpose
the test checks hookloop's behaviour and says so (see the README's "Differences from
Lightning" and tests/PEER_TESTS.md). Also: summaries of ``torch.compile``'d models."""

from __future__ import annotations

import json

import pytest
import torch
from hookloop_summary import Summary, summarize, unwrap_compiled
from torch import nn

from hookloop.plugins import available_plugins
from hookloop.testing import tiny_loop, tiny_model

UTIL = "Lightning tests/tests_pytorch/utilities/test_model_summary.py"
CALLBACK = "Lightning tests/tests_pytorch/callbacks/test_model_summary.py"
RICH = "Lightning tests/tests_pytorch/callbacks/test_rich_model_summary.py"


# ---------------------------------------------------------------------- models


class NoLayers(nn.Module):
    """No sub-modules and no registered parameter (a plain tensor attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = torch.rand(3, 3, requires_grad=True)

    def forward(self, *args, **kwargs):
        return {"loss": self.plain.sum()}


class Scrambled(nn.Module):
    """Layers declared in another order than they run, and one that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(10, 2)
        self.merge = nn.Linear(7, 9)
        self.first = nn.Linear(3, 5)
        self.act = nn.ReLU()
        self.idle = nn.Conv2d(1, 1, 1)

    def forward(self, a, b):
        return self.merge(self.act(torch.cat((self.first(a), self.second(b)), 1)))


def scrambled_input() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(2, 3), torch.rand(2, 10)


class Tokens(nn.Module):
    """Integer input to an embedding, float parameters after it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 20)
        self.reduce = nn.Linear(20, 1)

    def forward(self, ids):
        return self.reduce(self.embed(ids))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(10, 20, batch_first=True)
        self.out = nn.Linear(20, 2)

    def forward(self, x):
        seq, _ = self.rnn(x)
        return self.out(seq)


class Deep(nn.Module):
    """Six levels of nesting in one branch; 19 sub-modules in all."""

    def __init__(self) -> None:
        super().__init__()
        level = nn.Sequential(nn.Linear(5, 3))
        for _ in range(5):
            level = nn.Sequential(nn.Linear(5, 5), level)
        self.branch1 = level
        self.branch2 = nn.Linear(5, 10)
        self.head = Scrambled()

    def forward(self, x):
        return self.head(self.branch1(x), self.branch2(x))


class OwnParameter(nn.Module):
    """A parameter of the model itself, in no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.ones(2, 2))
        self.layer = nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(self.param @ x)


class Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.LazyLinear(5)
        self.layer2 = nn.LazyLinear(2)

    def forward(self, x):
        return self.layer2(self.layer1(x))


def quarter_million() -> nn.Module:
    """250,000 parameters: 1 MB in float32."""
    return nn.Sequential(nn.Linear(32, 1000, bias=False), nn.Linear(1000, 218, bias=False))


# ---------------------------------------------------------------------- utilities/test_model_summary.py


@pytest.mark.parametrize("depth", ["temp", -2, -99, 1.5, True])
def test_invalid_depth_raises(depth):
    # UTIL test_invalid_max_depth, test_raise_invalid_max_depth_value
    with pytest.raises(ValueError, match=f"depth must be .*got {depth!r}"):
        Summary(depth=depth)
    with pytest.raises(ValueError, match=f"depth must be .*got {depth!r}"):
        summarize(Deep(), torch.rand(2, 5), depth=depth)


@pytest.mark.parametrize("depth", [-1, 1])
def test_model_without_layers(depth):
    # UTIL test_empty_model_summary_shapes, test_empty_model_size
    s = summarize(NoLayers(), torch.zeros(1, 2, 3, 4, 5), depth=depth)
    assert s.note is None and s.layers == []
    assert s.total_params == 0 and s.mult_adds == 0 and s.params_size_mb == 0.0


@pytest.mark.parametrize("depth", [-1, 1])
def test_shapes_of_each_layer_and_of_an_unused_layer(depth):
    # UTIL test_linear_model_summary_shapes. Differs in order: rows follow the forward
    # pass (torchinfo), not the declaration; layers that did not run come last.
    model = Scrambled()
    model.train()
    s = summarize(model, scrambled_input(), depth=depth)
    assert [r.name for r in s.layers] == ["first", "second", "act", "merge", "idle"]
    assert [r.input_shape for r in s.layers] == [[2, 3], [2, 10], [2, 7], [2, 7], None]
    assert [r.output_shape for r in s.layers] == [[2, 5], [2, 2], [2, 7], [2, 9], None]
    assert model.training and all(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_integer_input_to_an_embedding():
    # UTIL test_mixed_dtype_model_summary
    s = summarize(Tokens(), torch.tensor([[0, 2, 1], [3, 5, 3]]))
    assert [r.input_shape for r in s.layers] == [[2, 3], [2, 3, 20]]
    assert [r.output_shape for r in s.layers] == [[2, 3, 20], [2, 3, 1]]
    # random inputs of a given size need the dtype
    s = summarize(Tokens(), input_size=(2, 3), dtypes=[torch.long])
    assert s.note is None and s.layers[0].output_shape == [2, 3, 20]


@pytest.mark.parametrize("depth", [-1, 0])
@pytest.mark.parametrize("fails", [False, True])
def test_no_hooks_left_behind(depth, fails):
    # UTIL test_hooks_removed_after_summarize (also after a failed forward pass)
    model = Scrambled()
    s = summarize(model, (torch.rand(2, 3),) if fails else scrambled_input(), depth=depth)
    assert (s.note is not None) == fails
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


@pytest.mark.parametrize("depth", [-1, 1])
def test_rnn_shapes(depth):
    # UTIL test_rnn_summary_shapes. Differs in form: an LSTM's output shape is that of
    # its first tensor (torchinfo's); Lightning nests the shapes of (h, c) with it.
    b, t = 3, 5
    s = summarize(Recurrent(), torch.zeros(b, t, 10), depth=depth)
    assert [r.input_shape for r in s.layers] == [[b, t, 10], [b, t, 20]]
    assert [r.output_shape for r in s.layers] == [[b, t, 20], [b, t, 2]]


@pytest.mark.parametrize("depth", [-1, 1])
def test_parameter_count_of_every_layer(depth):
    # UTIL test_summary_parameter_count
    model = Scrambled()
    s = summarize(model, scrambled_input(), depth=depth)
    counts = {r.name: r.num_params for r in s.layers}
    assert counts == {name: sum(p.numel() for p in m.parameters())
                      for name, m in model.named_children()}
    assert counts["act"] == 0 and counts["idle"] == 2


@pytest.mark.parametrize("depth", [-1, 1])
def test_layer_types(depth):
    # UTIL test_summary_layer_types (in forward order, see above)
    s = summarize(Scrambled(), scrambled_input(), depth=depth)
    assert [r.type for r in s.layers] == ["Linear", "Linear", "ReLU", "Linear", "Conv2d"]


class PartlyScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = torch.jit.script(nn.Linear(5, 3))
        self.layer2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer2(self.layer1(x))


@pytest.mark.parametrize("depth", [-1, 1])
def test_scripted_layer(depth):
    # UTIL test_summary_with_scripted_modules. A scripted layer's hooks do not fire, so
    # it has no shapes; its parameters count once (torchinfo alone counts them twice).
    model = PartlyScripted()
    s = summarize(model, torch.rand(2, 5), depth=depth)
    assert s.note is None
    assert [r.type for r in s.layers] == ["RecursiveScriptModule", "Linear"]
    assert [r.input_shape for r in s.layers] == [None, [2, 3]]
    assert [r.output_shape for r in s.layers] == [None, [2, 2]]
    assert s.total_params == 18 + 8 == sum(p.numel() for p in model.parameters())
    assert "Total params: 26" in s.text


@pytest.mark.parametrize(
    ("example", "shapes"),
    [
        ((), []),
        ((1, 2, 3), ["int", "int", "int"]),
        (torch.tensor(0), [[]]),
        ({"tensor": torch.zeros(1, 2, 3)}, [{"tensor": [1, 2, 3]}]),
        ({"t0": torch.zeros(1, 2, 3), "t1": torch.zeros(4, 5, 6)}, [{"t0": [1, 2, 3], "t1": [4, 5, 6]}]),
        (torch.zeros(2, 3, 4), [[2, 3, 4]]),
        ([torch.zeros(2, 3), torch.zeros(4, 5)], [[[2, 3], [4, 5]]]),
        ((torch.zeros(2, 3), torch.zeros(4, 5)), [[2, 3], [4, 5]]),
    ],
)
def test_input_shapes_of_example_inputs(example, shapes):
    # UTIL test_example_input_array_types. Differs in form: a tuple holds positional
    # arguments, a mapping keyword arguments and anything else (a list too) is the one
    # argument; non-tensors show their type, a 0-d tensor its empty shape, and a
    # mapping keeps its keys (Lightning: "?" for the first two, values only for the last).
    class Anything(nn.Module):
        def forward(self, *args, **kwargs):
            return None

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Anything()

        def forward(self, *args, **kwargs):
            return self.layer(*args, **kwargs)

    s = summarize(Model(), example)
    assert s.note is None and s.input_shapes == shapes


@pytest.mark.parametrize("depth", [-1, 1])
def test_params_size_mb(depth):
    # UTIL test_model_size
    s = summarize(quarter_million(), torch.rand(4, 32), depth=depth)
    assert s.params_size_mb == 1.0
    assert "Params size (MB): 1.00" in s.text


@pytest.mark.parametrize(("dtype", "mb"), [(torch.float16, 0.5), (torch.float32, 1.0), (torch.float64, 2.0)])
def test_params_size_follows_the_dtype(dtype, mb):
    # UTIL test_model_size_precision (on CPU: the parameters' dtype, not a Trainer's
    # precision setting, sets the size)
    s = summarize(quarter_million().to(dtype), torch.rand(4, 32, dtype=dtype))
    assert s.params_size_mb == mb
    assert summarize(quarter_million().to(dtype)).params_size_mb == mb  # without a forward pass


def test_lazy_layers_are_not_initialized():
    # UTIL test_lazy_model_summary. Differs: no forward pass is run (it would initialize
    # the parameters, a side effect on the model) and the note, not a warning, says why.
    model = Lazy()
    for s in (summarize(model), summarize(model, torch.rand(2, 4))):
        assert s.total_params == 0 and s.trainable_params == 0 and s.params_size_mb == 0.0
        assert "lazy" in s.note or "no input" in s.note
        assert [r.num_params for r in s.layers] == [0, 0]
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    plugin = Summary(print_fn=None)
    data = [(torch.rand(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    model = Lazy()
    tiny_loop([plugin], model=model, train_data=data, val_data=None).fit(max_epochs=1)
    assert "uninitialized (lazy) parameters" in plugin.summary.note
    assert model.layer1.weight.shape == (5, 4)  # the training step initialized them


@pytest.mark.parametrize("depth", [-1, 0, 1, 3, 999])
def test_depth_limits_the_rows(depth):
    # UTIL test_max_depth_param; -1 shows every level
    model = Deep()
    s = summarize(model, torch.rand(2, 5), depth=depth)
    names = [r.name for r in s.layers]
    if depth >= 0:
        assert all(name.count(".") < depth for name in names)
    deepest = max(name.count(".") + 1 for name, _ in model.named_modules() if name)
    assert len(names) == sum(1 for name, _ in model.named_modules()
                             if name and name.count(".") < (deepest if depth == -1 else depth))
    assert s.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("with_input", [False, True])
def test_summary_data_is_plain(with_input):
    # UTIL test_summary_data_output: the summary as data converts to JSON as it is
    s = summarize(nn.Linear(32, 2), torch.randn(4, 32) if with_input else None)
    data = json.loads(json.dumps(s.as_dict()))
    assert data["total_params"] == 66 and data["layers"] == [] and isinstance(data["text"], str)
    s = summarize(Deep(), torch.rand(2, 5) if with_input else None, depth=-1)
    data = json.loads(json.dumps(s.as_dict()))
    assert len(data["layers"]) == 19 and all(isinstance(r["name"], str) for r in data["layers"])


@pytest.mark.parametrize("with_input", [False, True])
def test_parameters_outside_any_layer(with_input):
    # UTIL test_summary_data_with_non_layer_params, test_summary_data_with_no_non_layer_params.
    # Differs in form: a field, other_params, not an extra table row (torchinfo's top
    # row of the table shows them).
    s = summarize(OwnParameter(), torch.ones(2, 2) if with_input else None)
    assert s.other_params == 4 and s.total_params == 4 + 6
    assert [r.name for r in s.layers] == ["layer"]
    assert summarize(quarter_million(), torch.rand(4, 32) if with_input else None).other_params == 0


def test_forward_runs_in_eval_mode_and_modes_are_restored():
    # UTIL test_summary_restores_module_mode
    seen = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Linear(2, 2)
            self.layer2 = nn.Linear(2, 2)

        def forward(self, x):
            seen.append((self.training, self.layer1.training, self.layer2.training))
            return self.layer2(self.layer1(x))

    model = Model()
    model.layer1.train()
    model.layer2.eval()
    assert summarize(model, torch.rand(2, 2)).note is None
    assert seen == [(False, False, False)]
    assert model.training and model.layer1.training and not model.layer2.training


def test_training_modes_count_submodules():
    # UTIL test_total_training_modes (the model itself is left out)
    assert summarize(nn.Module()).training_modes == {"train": 0, "eval": 0}
    model = Deep()
    assert summarize(model, torch.rand(2, 5)).training_modes == {"train": 19, "eval": 0}
    model.branch1[1][0].eval()
    model.branch2.eval()
    assert summarize(model, torch.rand(2, 5)).training_modes == {"train": 17, "eval": 2}
    assert summarize(model).training_modes == {"train": 17, "eval": 2}


def test_mode_of_each_row():
    # UTIL test_summary_training_mode
    model = Deep()
    model.branch1[1][0].eval()
    model.branch2.eval()
    s = summarize(model, torch.rand(2, 5), depth=1)
    assert [(r.name, r.training) for r in s.layers] == [("branch1", True), ("branch2", False), ("head", True)]
    s = summarize(model, torch.rand(2, 5), depth=-1)
    assert {r.name for r in s.layers if not r.training} == {"branch1.1.0", "branch2"}
    model = OwnParameter()
    model.layer.eval()
    s = summarize(model, torch.ones(2, 2))
    assert [r.training for r in s.layers] == [False]
    assert s.training_modes == {"train": 0, "eval": 1}


# ---------------------------------------------------------------------- callbacks/test_model_summary.py


def test_summary_is_opt_in(tmp_path, monkeypatch):
    # CALLBACK test_model_summary_callback_present_trainer,
    # test_model_summary_callback_with_enable_model_summary_false. Differs: a Trainer
    # adds its ModelSummary unless told not to; a loop has a summary only when the
    # plugin is in its list (its entry point is a class, which is never autoloaded).
    monkeypatch.chdir(tmp_path)
    assert isinstance(available_plugins(refresh=True)["summary"].obj, type)
    with tiny_loop([], autoload=True) as loop:
        assert loop.get_plugin("summary") is None
    with tiny_loop([Summary(print_fn=None)]) as loop:
        assert isinstance(loop.get_plugin("summary"), Summary)


def test_default_depth_is_three():
    # CALLBACK test_model_summary_callback_with_enable_model_summary_true. Differs:
    # torchinfo's default depth, 3, not Lightning's 1.
    assert Summary().depth == 3


def test_depth_zero_keeps_the_totals():
    # (Lightning's ModelSummary callback prints nothing at max_depth=0.) Differs: here
    # depth 0 gives a summary without rows, still with the totals; leave the plugin out
    # for no summary.
    out: list[str] = []
    plugin = Summary(depth=0, print_fn=out.append)
    tiny_loop([plugin]).fit(max_epochs=1)
    assert plugin.summary.layers == [] and plugin.summary.total_params == 131
    assert "Total params: 131" in out[0]


def test_custom_output_gets_text_and_data():
    # CALLBACK test_custom_model_summary_callback_summarize. A custom output is a
    # print_fn (text) and plugin.summary (data), rather than an overridden method.
    out: list[str] = []
    plugin = Summary(print_fn=out.append)
    data = [(torch.randn(4, 32), torch.randint(0, 2, (4,)))]
    model = nn.Sequential(nn.Linear(32, 2))
    tiny_loop([plugin], model=model, train_data=data, val_data=None).fit(max_epochs=1)
    s = plugin.summary
    assert out == [s.text]
    row = s.layers[0]
    assert (row.name, row.type, row.num_params, row.training) == ("0", "Linear", 66, True)
    assert s.total_params == s.trainable_params == 66
    assert isinstance(row.mult_adds, int)
    assert s.training_modes == {"train": 1, "eval": 0}


# ---------------------------------------------------------------------- callbacks/test_rich_model_summary.py


def test_row_of_a_linear_layer():
    # RICH test_rich_summary_tuples. Differs in unit: mult-adds as torchinfo counts them,
    # one per weight and bias element per sample (4 x 66 = 264), where Lightning counts
    # the FLOPs of the product (2 x 4 x 32 x 2 = 512).
    s = summarize(nn.Sequential(nn.Linear(32, 2)), torch.randn(4, 32))
    row = s.layers[0]
    assert (row.name, row.type, row.num_params, row.training) == ("0", "Linear", 66, True)
    assert row.mult_adds == 4 * 66 == s.mult_adds
    assert (row.input_shape, row.output_shape) == ([4, 32], [4, 2])


def test_size_is_printed_in_mb_not_as_a_count():
    # RICH test_rich_summary_model_size_formatting
    s = summarize(nn.Linear(1000, 1000), torch.randn(1, 1000))
    assert s.params_size_mb == pytest.approx(4.004)
    assert "Params size (MB): 4.00" in s.text and "1.0 M" not in s.text


# ---------------------------------------------------------------------- torch.compile


class Counting:
    """A torch.compile backend that records every compile and runs the graph as is."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_compiled_model_is_summarised_uncompiled():
    torch._dynamo.reset()
    backend = Counting()
    model = Deep()
    compiled = torch.compile(model, backend=backend)
    assert unwrap_compiled(compiled) is model and unwrap_compiled(model) is model
    s = summarize(compiled, torch.rand(2, 5), depth=-1)
    plain = summarize(Deep(), torch.rand(2, 5), depth=-1)
    assert backend.compiles == 0
    assert s.note is None and s.model == "Deep"
    assert [r.name for r in s.layers] == [r.name for r in plain.layers]
    assert not any("_orig_mod" in r.name for r in s.layers) and "_orig_mod" not in s.text
    assert s.total_params == plain.total_params and s.training_modes == plain.training_modes
    fallback = summarize(compiled)
    assert fallback.model == "Deep" and not any("_orig_mod" in r.name for r in fallback.layers)


def test_compiled_submodule_is_run_uncompiled_and_put_back():
    torch._dynamo.reset()
    backend = Counting()
    model = Deep()
    inner = model.branch1[1]
    model.branch1[1] = torch.compile(inner, backend=backend)
    compiled_child = model.branch1[1]
    s = summarize(model, torch.rand(2, 5), depth=-1)
    assert backend.compiles == 0 and s.note is None
    assert "branch1.1.0" in [r.name for r in s.layers]
    assert not any("_orig_mod" in r.name for r in s.layers)
    assert model.branch1[1] is compiled_child  # put back
    assert not any("_orig_mod" in r.name for r in summarize(model, depth=-1).layers)


def test_plugin_on_a_compiled_model():
    torch._dynamo.reset()
    model = tiny_model(0)
    plugin = Summary(print_fn=None)
    loop = tiny_loop([plugin], model=torch.compile(model, backend="eager"))
    loop.fit(max_epochs=1)
    s = plugin.summary
    assert s.note is None and s.model == type(model).__name__
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.layers and not any("_orig_mod" in r.name for r in s.layers)


@pytest.mark.slow
def test_plugin_on_an_inductor_compiled_model():
    torch._dynamo.reset()
    model = tiny_model(0)
    plugin = Summary(input_size=(2, 4), print_fn=None)
    loop = tiny_loop([plugin], model=torch.compile(model))
    loop.fit(max_epochs=1)
    assert plugin.summary.note is None and not any("_orig_mod" in r.name for r in plugin.summary.layers)
