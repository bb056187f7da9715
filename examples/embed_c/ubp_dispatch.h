/*
 * Picking the AArch64 kernel variant a CPU can run: SVE where the CPU has it, NEON otherwise.
 *
 * An SVE kernel called on a CPU without SVE dies with SIGILL, and a phone app cannot know in
 * advance which CPU it lands on. A bundle exported with both AArch64 targets carries both
 * variants of every kernel under the same C ABI; an application asks once at start-up:
 *
 *     const char *target = ubp_aarch64_target();   // "aarch64-sve" or "aarch64-neon"
 *
 * and loads BUNDLE/<target>/<layer>.<target>.so (examples/embed_c/bundle_main.c does so for
 * TARGET "aarch64"). The answer comes from the kernel's hardware capability bits
 * (getauxval(AT_HWCAP) & HWCAP_SVE), so it also holds under qemu-user's -cpu models.
 * On other architectures ubp_cpu_has_sve() is 0.
 */
#ifndef UBP_DISPATCH_H_INCLUDED
#define UBP_DISPATCH_H_INCLUDED

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_SVE
#define HWCAP_SVE (1UL << 22) /* Linux arch/arm64 uapi hwcap.h */
#endif
#endif

static inline int ubp_cpu_has_sve(void) {
#if defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_SVE) != 0;
#else
    return 0;
#endif
}

/* The AArch64 bundle target this CPU runs: "aarch64-sve" with SVE, else "aarch64-neon". */
static inline const char *ubp_aarch64_target(void) {
    return ubp_cpu_has_sve() ? "aarch64-sve" : "aarch64-neon";
}

#endif /* UBP_DISPATCH_H_INCLUDED */
