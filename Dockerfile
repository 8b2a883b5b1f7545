# The maskface image: Ray's GPU image with this project and its extras installed, run as
# the image's own non-root user. It cannot be built in this repo's CI (no registry for
# the base image there); build and push it where you run clusters (docs/cluster.md):
#   docker build -t registry.example.com/maskface:0.1.0 .
#   docker push registry.example.com/maskface:0.1.0
# The Ray version here must be pyproject.toml's pin (tests/test_launch_configs.py checks).
FROM rayproject/ray:2.60.0-py311-gpu

# rayproject images' own user `ray`: uid 1000, group users (gid 100), home /home/ray,
# Python on PATH. Numeric, so the host never has to resolve the name.
USER 1000:100
WORKDIR /home/ray/maskface

# the checkout (.dockerignore keeps .venv/, weights/ and outputs out); the job specs in
# jobs/ stay here, the working directory RayJob entrypoints run from
COPY --chown=1000:100 . /home/ray/maskface

# The same command as cluster.yaml's setup_commands: the project with its `align` extra,
# its direct dependencies at the versions the tests ran with (constraints.txt; torch,
# torchvision, lpips and ray are pinned in pyproject.toml). torch 2.14.1's PyPI wheel
# brings its own CUDA 13.0 libraries: GPU nodes need a driver that supports CUDA 13.0.
RUN pip install --no-cache-dir -c /home/ray/maskface/constraints.txt "/home/ray/maskface[align]"
