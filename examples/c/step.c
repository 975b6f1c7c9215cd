/* One speculation step through speckv's C ABI on its own buffers:
 *   draft statistics (speckv_softmax_stats, features accumulated per sequence)
 *   → γ decision (speckv_decide_gamma, the 16-unit MLP)
 *   → lossless verification (speckv_verify).
 * Inputs are made by formula (exact in f32), so the Rust API can reproduce them; the output is a
 * canonical text that capi/tests/c_example.rs compares with the Rust API's.
 *
 *   cc examples/c/step.c -Iinclude -Ltarget/release -lspeckv_c -Wl,-rpath,$PWD/target/release -o step
 *   ./step assets/controller.json            (CPU backend)
 *
 * Build the library first: cargo build --release -p speckv-capi. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "speckv.h"

enum { B = 2, G = 4, V = 64 };

#define CHECK(call)                                                                   \
    do {                                                                              \
        enum SpeckvStatus s_ = (call);                                                \
        if (s_ != SPECKV_STATUS_OK) {                                                 \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)s_, speckv_last_error()); \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

/* Draft logits of sequence b, position j, token k. */
static float draft_logit(int b, int j, int k) { return (float)((k * k * (1 + j + b) + k * 37 + b * 5) % 64) / 4.0f - 8.0f; }
/* Target logits: sequence 0 agrees with the draft, sequence 1 is perturbed; row G is the bonus. */
static float target_logit(int b, int j, int k) {
    if (j == G) return (float)((k * 29 + b * 3) % 64) / 8.0f - 4.0f;
    return draft_logit(b, j, k) + (b == 1 ? (float)((k * 13) % 7) / 4.0f : 0.0f);
}

int main(int argc, char **argv) {
    const char *controller = argc > 1 ? argv[1] : "assets/controller.json";
    static float draft[B * G * V], target[B * (G + 1) * V];
    for (int b = 0; b < B; b++)
        for (int j = 0; j <= G; j++)
            for (int k = 0; k < V; k++) {
                if (j < G) draft[(b * G + j) * V + k] = draft_logit(b, j, k);
                target[(b * (G + 1) + j) * V + k] = target_logit(b, j, k);
            }

    SpeckvContext *ctx = NULL;
    CHECK(speckv_context_create_cpu(&ctx));
    const uint32_t candidates[] = {1, 2, 3, 4};
    CHECK(speckv_load_controller(ctx, controller, candidates, 4, NULL));

    /* Draft statistics, one position at a time (as a decode loop drafts), B rows per call. */
    SpeckvRowStats stats[G][B];
    SpeckvFeatureAccum accum[B];
    int32_t tokens[B * G];
    for (int j = 0; j < G; j++) {
        SpeckvStatsArgs a = {0};
        a.logits = draft + j * V;
        a.dtype = SPECKV_DTYPE_F32;
        a.rows = B;
        a.vocab = V;
        a.row_stride = G * V;
        a.temperature = 1.0f;
        a.sample = 1;
        a.seed = 42;
        a.step = (uint64_t)j;
        a.accumulate = j == 0 ? SPECKV_ACCUMULATE_RESET : SPECKV_ACCUMULATE_ADD;
        a.accum = accum;
        a.out = stats[j];
        CHECK(speckv_softmax_stats(ctx, &a));
        for (int b = 0; b < B; b++) {
            tokens[b * G + j] = stats[j][b].sampled;
            printf("stats j=%d b=%d entropy=%.6f confidence=%.6f argmax=%d sampled=%d\n", j, b,
                   stats[j][b].entropy, stats[j][b].confidence, stats[j][b].argmax, stats[j][b].sampled);
        }
    }

    /* γ per sequence from the accumulated features (compression code 0 = fp16). */
    int32_t gammas[B];
    float expected[B];
    uint32_t gamma_flags[B];
    CHECK(speckv_decide_gamma(ctx, accum, B, 0.0f, 4, gammas, expected, gamma_flags));
    for (int b = 0; b < B; b++)
        printf("gamma b=%d gamma=%d expected=%.6f flags=%u\n", b, gammas[b], expected[b], gamma_flags[b]);

    /* Verification of γ_b drafts per sequence. */
    float temps[B] = {1.0f, 1.0f};
    int32_t accepted[B], emitted[B * (G + 1)], count[B], counterfactual[B * (G + 1)];
    uint32_t flags[B];
    SpeckvVerifyArgs v = {0};
    v.target_logits = target;
    v.dtype = SPECKV_DTYPE_F32;
    v.target_stride = V;
    v.draft = draft;
    v.draft_kind = SPECKV_DRAFT_LOGITS;
    v.draft_stride = V;
    v.draft_temperature = temps;
    v.draft_tokens = tokens;
    v.gammas = gammas;
    v.target_temperature = temps;
    v.batch = B;
    v.gamma_max = G;
    v.vocab = V;
    v.seed = 7;
    v.step = 0;
    v.accepted = accepted;
    v.emitted = emitted;
    v.emitted_count = count;
    v.counterfactual = counterfactual;
    v.flags = flags;
    CHECK(speckv_verify(ctx, &v));
    for (int b = 0; b < B; b++) {
        printf("verify b=%d accepted=%d flags=%u emitted=", b, accepted[b], flags[b]);
        for (int i = 0; i < count[b]; i++) printf("%s%d", i ? "," : "", emitted[b * (G + 1) + i]);
        printf(" counterfactual=");
        for (int i = 0; i <= G; i++) printf("%s%d", i ? "," : "", counterfactual[b * (G + 1) + i]);
        printf("\n");
    }

    /* Misuse is an error with a message, never a crash. */
    if (speckv_verify(ctx, NULL) != SPECKV_STATUS_NULL_POINTER) return 2;
    printf("misuse: %s\n", speckv_last_error());
    speckv_context_destroy(ctx);
    return 0;
}
