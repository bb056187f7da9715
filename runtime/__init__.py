"""``ubpdsl.runtime``: targets, the toolchain, building self-contained ``.so`` files, the compile
cache, C headers, loading kernels on the host and running AArch64 builds under qemu-user."""
