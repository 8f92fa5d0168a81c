"""Test support shipped with the package: the fake Bemsoft API (`fakeapi`), legacy-shaped
sample data (`sampledata`) and the harness the tests, the reliability scenarios, the
benchmarks and the demo share (`harness`). The monitor itself never imports this package."""
