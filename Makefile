# The two commands of README.md. Each does all setup itself (scripts/setup.sh is idempotent).
.PHONY: demo test setup doctor

demo:
	@scripts/demo.sh

test:
	@scripts/test.sh

setup:
	@scripts/setup.sh

doctor: setup
	@"$${CARGO_TARGET_DIR:-target}/release/ddetr" doctor
