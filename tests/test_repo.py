"""Repository invariants that CI relies on."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```sh\n(.*?)\n```", text, flags=re.M | re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 1, f"README should hold exactly one test command, found {tests}"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests[0] in ci, f"`.ci/run` does not run the README's test command {tests[0]!r}"


def test_readme_has_a_benchmark_command():
    assert any("benchmarks.run" in c for c in _readme_commands())


def test_cuda_sources_are_torch_free():
    for path in (ROOT / "csrc" / "kernels").iterdir():
        text = path.read_text()
        for banned in ("#include <torch", "#include <ATen", "#include <c10", "exit("):
            assert banned not in text, f"{path.name} contains {banned!r}"
