"""The test suite, a package so that its helper modules are imported by one name everywhere:
`from tests.workspace import make_workspace` in a test and in bench/ (`python -m bench` from the root)."""
