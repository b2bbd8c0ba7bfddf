"""`python -m robustft ...` is the `robustft` console script; under torchrun
(`torchrun --nproc_per_node=N -m robustft ...`) it is one data-parallel run across the N processes."""

from robustft.cli import main

if __name__ == "__main__":
    main()
