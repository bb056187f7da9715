/*
 * ubpdsl's qemu TCG plugin: counts executed AArch64 instructions by class (FMA, load, store,
 * prefetch, other) inside one address range [lo, hi) of the guest (the kernel function), so
 * the harness's own I/O is not counted.
 *
 *   qemu-aarch64 -plugin insn_count.so,lo=0x...,hi=0x...,out=FILE ./harness in out
 *
 * At exit it writes one line "fma load store prefetch other total" (decimal) to FILE.
 * Built by ubpdsl.runtime.insncount with the host C compiler (gcc -shared -fPIC).
 *
 * Debian's qemu-user ships no plugin header, so the few declarations of the documented plugin
 * API (docs/devel/tcg-plugins.rst, API version 1 as in qemu 7.2) used here are written out
 * below. The functions are resolved from the qemu executable when it loads the plugin.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the plugin API subset (qemu 7.2, API version 1) ---- */
typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min, cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus, max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb)(qemu_plugin_id_t, void *);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *, enum qemu_plugin_op, void *, uint64_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- classification ---- */
enum { C_FMA, C_LOAD, C_STORE, C_PREFETCH, C_OTHER, C_COUNT };

#define MATCH(w, mask, value) (((w) & (mask)) == (value))

/* Class of one A64 instruction word (FP/SIMD/SVE fused multiply-adds, memory accesses). */
static int classify(uint32_t w) {
    /* FMA: scalar FMADD/FMSUB/FNMADD/FNMSUB */
    if (MATCH(w, 0xFF000000u, 0x1F000000u)) return C_FMA;
    /* AdvSIMD FMLA/FMLS (vector, single/double) */
    if (MATCH(w, 0xBF20FC00u, 0x0E20CC00u)) return C_FMA;
    /* AdvSIMD FMLA/FMLS by element (vector and scalar forms) */
    if (MATCH(w, 0xBF80B400u, 0x0F801000u) || MATCH(w, 0xFF80B400u, 0x5F801000u)) return C_FMA;
    /* SVE FMLA/FMLS/FNMLA/FNMLS/FMAD/FMSB/FNMAD/FNMSB (predicated vectors) */
    if (MATCH(w, 0xFF200000u, 0x65200000u)) return C_FMA;
    /* SVE FMLA/FMLS (indexed) */
    if (MATCH(w, 0xFF20F800u, 0x64200000u)) return C_FMA;

    /* SVE memory: op0 (bits 28:25) = 0010, group in bits 31:29 */
    if (MATCH(w, 0x1E000000u, 0x04000000u) && (w >> 31)) {
        uint32_t group = w >> 29;
        if (group == 7) return C_STORE;            /* ST1*, STNT1*, STR (vector/predicate), scatters */
        if (group == 5) return C_LOAD;             /* contiguous loads, LDNT1*, LD1RQ*, LD2..4 */
        if (group == 4) {                          /* 32-bit gathers, LD1R*, LDR, PRF* */
            if (MATCH(w, 0xFFC08010u, 0x85C00000u)) return C_PREFETCH; /* PRF* scalar + imm */
            if (MATCH(w, 0xFE60E010u, 0x8400C000u)) return C_PREFETCH; /* PRF* scalar + scalar */
            if (MATCH(w, 0xFE60E010u, 0x8400E000u)) return C_PREFETCH; /* PRF* vector + imm */
            if (MATCH(w, 0xFFA08010u, 0x84200000u)) return C_PREFETCH; /* PRF* scalar + 32-bit vector */
            return C_LOAD;
        }
        if (group == 6) {                          /* 64-bit gathers and prefetches */
            if (MATCH(w, 0xFFA08010u, 0xC4200000u)) return C_PREFETCH; /* scalar + unpacked vector */
            if (MATCH(w, 0xFFE08010u, 0xC4608000u)) return C_PREFETCH; /* scalar + 64-bit vector */
            if (MATCH(w, 0xFE60E010u, 0xC400E000u)) return C_PREFETCH; /* vector + imm */
            return C_LOAD;
        }
        return C_OTHER;
    }

    /* Base/AdvSIMD loads and stores: op0 (bits 28:25) = x1x0 */
    if (MATCH(w, 0x0A000000u, 0x08000000u)) {
        uint32_t b2928 = (w >> 28) & 3;
        uint32_t v = (w >> 26) & 1, size = w >> 30, opc = (w >> 22) & 3;
        switch (b2928) {
        case 0: /* exclusives, ordered, AdvSIMD LD1..4/ST1..4 structures: L = bit 22 */
            return (w >> 22) & 1 ? C_LOAD : C_STORE;
        case 1: /* load literal (PRFM literal: opc 11, V 0) */
            if ((w >> 24) & 1) return C_OTHER;    /* memory tagging / RCpc forms: rare */
            return (size == 3 && !v) ? C_PREFETCH : C_LOAD;
        case 2: /* load/store pair incl. LDNP/STNP: L = bit 22 */
            return (w >> 22) & 1 ? C_LOAD : C_STORE;
        default: /* register forms: unsigned imm, unscaled, pre/post-index, register offset */
            if (!((w >> 24) & 1) && ((w >> 21) & 1) && ((w >> 10) & 3) == 0)
                return C_LOAD;                     /* atomics (LDADD, SWP, ...) */
            if (!v && size == 3 && opc == 2) return C_PREFETCH; /* PRFM / PRFUM */
            if (opc == 0 || (v && opc == 2)) return C_STORE;
            return C_LOAD;
        }
    }
    return C_OTHER;
}

static uint64_t counts[C_COUNT];
static uint64_t lo, hi = UINT64_MAX;
static const char *out_path;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        if (pc < lo || pc >= hi || qemu_plugin_insn_size(insn) != 4) continue;
        uint32_t w;
        memcpy(&w, qemu_plugin_insn_data(insn), 4);
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &counts[classify(w)], 1);
    }
}

static void report_counts(qemu_plugin_id_t id, void *userdata) {
    (void)id; (void)userdata;
    FILE *f = out_path ? fopen(out_path, "w") : stderr;
    if (!f) return;
    uint64_t total = 0;
    for (int c = 0; c < C_COUNT; c++) total += counts[c];
    fprintf(f, "%llu %llu %llu %llu %llu %llu\n", (unsigned long long)counts[C_FMA],
            (unsigned long long)counts[C_LOAD], (unsigned long long)counts[C_STORE],
            (unsigned long long)counts[C_PREFETCH], (unsigned long long)counts[C_OTHER],
            (unsigned long long)total);
    if (f != stderr) fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv) {
    if (strcmp(info->target_name, "aarch64") != 0) return 1;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "lo=", 3)) lo = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "hi=", 3)) hi = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "out=", 4)) out_path = argv[i] + 4;
        else { fprintf(stderr, "insn_count: unknown argument %s\n", argv[i]); return 1; }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, report_counts, NULL);
    return 0;
}
