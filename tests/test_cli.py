"""The ``hookloop`` command, run as a subprocess: --version, the plugin table, --plan for
exactly the given specs, argument errors, distribution commands and the demo hint."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hookloop
from hookloop.cli import parse_plan_specs, positive_int

FAKE_SITE = Path(__file__).parent / "fixtures" / "site"
CLASH_SITE = FAKE_SITE / "clash"


def hookloop_cmd(*args: str, sites: tuple[Path, ...] = (FAKE_SITE,), code: str | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLOOP_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore::RuntimeWarning"
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "hookloop.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_version() -> None:
    res = hookloop_cmd("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"hookloop {hookloop.__version__}"


def test_plugins_lists_every_installed_plugin() -> None:
    res = hookloop_cmd("plugins")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:] if line.strip()}
    assert {"fake", "fake_always", "fake_broken"} <= set(rows)
    assert "always-on" in rows["fake_always"] and "import failed: ImportError" in rows["fake_broken"]
    assert "call plan" not in res.stdout


def test_plugins_reports_a_name_of_two_distributions() -> None:
    res = hookloop_cmd("plugins", sites=(FAKE_SITE, CLASH_SITE))
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("fake "))
    assert "hookloop-fake " in row
    assert "also registered by hookloop-fake-clash 0.1.0 (hookloop_fake_clash:OtherCounter) (not used)" in row


def _plan_of(out: str, hook: str) -> list[str]:
    block = re.search(rf"^{hook}:.*\n((?:  \d+\. .*\n?)*)", out, re.M)
    assert block is not None, out
    return [line.split(". ", 1)[1].split("  [")[0] for line in block.group(1).splitlines()]


def test_plan_is_the_call_order_of_exactly_the_given_specs() -> None:
    res = hookloop_cmd("plugins", "--plan", "fake", 'fake:{"hookloop_name": "fake_b", "scale": 2}')
    assert res.returncode == 0, res.stderr
    assert _plan_of(res.stdout, "on_train_batch_end") == ["fake", "fake_b"]
    assert _plan_of(res.stdout, "on_fit_start") == ["fake_always"]  # the always-on plugin
    res = hookloop_cmd("plugins", "--no-autoload", "--plan",
                       '[["fake", {"hookloop_name": "fake_b"}], "fake"]')
    assert res.returncode == 0, res.stderr
    assert _plan_of(res.stdout, "on_train_batch_end") == ["fake_b", "fake"]
    assert _plan_of(res.stdout, "on_fit_start") == []
    res = hookloop_cmd("plugins", "--no-autoload", "--plan", '{"fake": {"scale": 3}}')
    assert res.returncode == 0 and _plan_of(res.stdout, "on_train_batch_end") == ["fake"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plugins", "--plan", "nope"],
         r"hookloop plugins: error: argument --plan: plugins\[0\] = 'nope': no hookloop plugin named "
         r"'nope' is installed \(available: .*fake.*\); install the distribution"),
        (["plugins", "--plan", "fak"], r"did you mean 'fake'\?"),
        (["plugins", "--plan", "fake:{scale: 2}"],
         r"argument --plan: 'fake:\{scale: 2\}' is not valid JSON: Expecting property name enclosed "
         r"in double quotes at character 2; one \(name, options\) pair is written NAME:OPTIONS"),
        (["plugins", "--plan", "fake:[1]"],
         r"'fake:\[1\]': the options after 'fake:' must be a JSON object"),
        (["plugins", "--plan", '["fake", {"scale": 2}]'],
         r"is ambiguous: a list of two specs, or one pair\?"),
        (["plugins", "--plan", 'fake:{"colour": 1}'],
         r"plugins\[0\] = \['fake', \{'colour': 1\}\]: plugin 'fake': bad options \{'colour': 1\}: "
         r".*unexpected keyword argument 'colour' \(it takes FakeCounter\(scale: float = 1\.0\)\)"),
        (["plugins", "--plan", '[["fake", {}, 3]]'], r"a list of 3 item\(s\) is not a plugin spec"),
        (["plugins", "--bogus"], r"hookloop: error: unrecognized arguments: --bogus"),
        (["plugin"], r"hookloop: error: unknown command 'plugin'; did you mean 'plugins'\?"),
        (["dmeo"], r"unknown command 'dmeo'; did you mean 'demo'\?"),
        ([], r"hookloop: error: the following arguments are required: COMMAND"),
    ],
)
def test_argument_errors_read_well(args: list[str], message: str) -> None:
    res = hookloop_cmd(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert re.search(message, res.stderr), res.stderr
    assert "Traceback" not in res.stderr


def test_positive_int_names_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="hookloop demo")
    parser.add_argument("--epochs", type=positive_int)
    assert parser.parse_args(["--epochs", "3"]).epochs == 3
    for bad in ("abc", "0", "-2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--epochs", bad])
        assert f"argument --epochs: expected a positive integer; got {bad!r}" in capsys.readouterr().err


def test_parse_plan_specs() -> None:
    assert parse_plan_specs(["a", 'b:{"x": 1}', '[["c", null], "d"]', '{"e": {}}']) == [
        "a", ["b", {"x": 1}], ["c", None], "d", {"e": {}}]


def test_a_command_of_a_distribution_runs_with_its_arguments() -> None:
    res = hookloop_cmd("hello", "a", "--b", sites=(FAKE_SITE, CLASH_SITE))
    assert res.returncode == 3 and res.stdout.strip() == "hello from hookloop-fake-clash: a --b"
    res = hookloop_cmd("--help", sites=(FAKE_SITE, CLASH_SITE))
    assert res.returncode == 0 and re.search(r"hello\s+from hookloop-fake-clash", res.stdout)
    # a distribution cannot take a built-in name
    res = hookloop_cmd("plugins", sites=(FAKE_SITE, CLASH_SITE))
    assert res.returncode == 0 and "fake_always" in res.stdout
    assert "ignoring command 'plugins' of hookloop-fake-clash (hookloop_fake_clash:hello): " \
           "'plugins' is a built-in command" in res.stderr


WITHOUT_DEMO = (  # the installed hookloop-demo hidden: no distribution provides the command
    "import sys\n"
    "import hookloop.cli as cli\n"
    "cli._distribution_commands = lambda: {}\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def test_demo_without_its_distribution_says_what_to_install() -> None:
    res = hookloop_cmd("demo", "--quick", code=WITHOUT_DEMO)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip() == (
        "hookloop: the 'demo' command is provided by the distribution hookloop-demo, which is not "
        "installed: pip install hookloop-demo (from a checkout of hookloop: make demo)"
    )
    res = hookloop_cmd("--help", code=WITHOUT_DEMO)
    assert re.search(r"demo\s+not installed \(pip install hookloop-demo\)", res.stdout)


def test_demo_help_reaches_the_demo() -> None:
    res = hookloop_cmd("demo", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: hookloop demo" in res.stdout
