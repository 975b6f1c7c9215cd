/* One adaptive speculation step through speckv's C ABI, γ decided per sequence while drafting:
 *   per drafted position, speckv_softmax_stats_stop — the draft's statistics, then the stopping
 *   rule (the hazard model's P(accept) against the step's costs): keep or discard the draft, draft
 *   on or stop — with γ_b written where speckv_verify reads it;
 *   the loop ends when the stop counter reaches the batch size (or at γmax);
 *   → lossless verification of γ_b drafts per sequence (speckv_verify);
 *   → the online calibration of the hazard model's odds from the verified drafts: one scale for
 *     the batch (speckv_calibrate), or one per sequence (speckv_calibrate_each, for
 *     SpeckvStopArgs.odds_scales) — the scales the next step's rule takes.
 * Inputs are made by formula (exact in f32), so the Rust API can reproduce them; the output is a
 * canonical text that capi/tests/c_example.rs compares with the Rust API's.
 *
 *   cc examples/c/auto_step.c -Iinclude -Ltarget/release -lspeckv_c -Wl,-rpath,$PWD/target/release -o auto_step
 *   ./auto_step                      (the shipped hazard model, the assumed costs; CPU backend)
 *   ./auto_step hazard.json cost.json  (from speckv train --hazard and speckv profile)
 *
 * On a CUDA context the same calls take device pointers and run asynchronously on your stream;
 * read the counter (one u32) once per position, or enqueue γmax positions and read it at the end.
 * Build the library first: cargo build --release -p speckv-capi. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "speckv.h"

enum { B = 3, GMAX = 6, V = 64 };

#define CHECK(call)                                                                   \
    do {                                                                              \
        enum SpeckvStatus s_ = (call);                                                \
        if (s_ != SPECKV_STATUS_OK) {                                                 \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)s_, speckv_last_error()); \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

/* Draft logits of sequence b, position j, token k: one clear winner for the first 2·b positions
 * (confident drafts), a flat row after (sequence 0 is flat throughout). */
static float draft_logit(int b, int j, int k) {
    if (k == (j * 5 + b * 11) % V) return j < 2 * b ? 12.0f : 1.0f;
    return (float)((k * k * (1 + j + b) + k * 37 + b * 5) % 64) / 16.0f - 2.0f;
}
/* Target logits: agree with the draft's winner for the first b + 1 positions, then prefer another
 * token; row GMAX is the bonus row. */
static float target_logit(int b, int j, int k) {
    if (j < GMAX && j <= b) return draft_logit(b, j, k);
    return k == (j * 7 + b) % V ? 9.0f : (float)((k * 29 + b * 3) % 64) / 16.0f;
}

int main(int argc, char **argv) {
    const char *hazard = argc > 1 ? argv[1] : NULL;
    const char *cost = argc > 2 ? argv[2] : NULL;
    static float draft[B * GMAX * V], target[B * (GMAX + 1) * V];
    for (int b = 0; b < B; b++)
        for (int j = 0; j <= GMAX; j++)
            for (int k = 0; k < V; k++) {
                if (j < GMAX) draft[(b * GMAX + j) * V + k] = draft_logit(b, j, k);
                target[(b * (GMAX + 1) + j) * V + k] = target_logit(b, j, k);
            }

    SpeckvContext *ctx = NULL;
    CHECK(speckv_context_create_cpu(&ctx));
    CHECK(speckv_load_hazard(ctx, hazard));
    SpeckvStopArgs stop;
    memset(&stop, 0, sizeof stop);
    CHECK(speckv_step_costs(cost, GMAX, &stop.costs));
    printf("costs draft=%.6f verify0=%.6f verify%d=%.6f\n", stop.costs.draft, stop.costs.verify[0], GMAX,
           stop.costs.verify[GMAX]);

    /* The draft loop: one position per call, B rows each. State needs no initialisation: the
     * first position's RESET starts every sequence afresh. */
    SpeckvRowStats stats[B];
    SpeckvFeatureAccum accum[B];
    SpeckvStopState state[B];
    int32_t gammas[B], tokens[B * GMAX];
    float hazards[B * SPECKV_STOP_TIMES];
    uint32_t stopped = 0;
    stop.state = state;
    stop.gammas_out = gammas;
    stop.stopped_count = &stopped;
    stop.hazards_out = hazards;
    stop.gamma_max = GMAX;
    stop.compression_code = 0.0f; /* fp16 target */
    stop.odds_scale = 1.0f;       /* the model as trained */
    int drafted = 0;
    for (int j = 0; j < GMAX && stopped < B; j++) {
        SpeckvStatsArgs a;
        memset(&a, 0, sizeof a);
        a.logits = draft + j * V;
        a.dtype = SPECKV_DTYPE_F32;
        a.rows = B;
        a.vocab = V;
        a.row_stride = GMAX * V;
        a.temperature = 0.0f; /* greedy drafts */
        a.step = (uint64_t)j;
        a.accumulate = j == 0 ? SPECKV_ACCUMULATE_RESET : SPECKV_ACCUMULATE_ADD;
        a.accum = accum;
        a.out = stats;
        CHECK(speckv_softmax_stats_stop(ctx, &a, &stop));
        drafted++;
        for (int b = 0; b < B; b++) {
            tokens[b * GMAX + j] = stats[b].argmax;
            printf("draft j=%d b=%d confidence=%.6f kept=%u stopped=%u expected=%.6f\n", j, b,
                   stats[b].confidence, state[b].kept, state[b].stopped, state[b].expected);
        }
        printf("after j=%d stopped=%u\n", j, stopped);
    }
    printf("drafted positions=%d\n", drafted);
    for (int b = 0; b < B; b++) printf("gamma b=%d gamma=%d\n", b, gammas[b]);

    /* Verification of γ_b drafts per sequence, greedy. */
    float zero[B] = {0.0f, 0.0f, 0.0f};
    int32_t accepted[B], emitted[B * (GMAX + 1)], count[B];
    uint32_t flags[B];
    SpeckvVerifyArgs v;
    memset(&v, 0, sizeof v);
    v.target_logits = target;
    v.dtype = SPECKV_DTYPE_F32;
    v.target_stride = V;
    v.draft = draft;
    v.draft_kind = SPECKV_DRAFT_LOGITS;
    v.draft_stride = V;
    v.draft_temperature = zero;
    v.draft_tokens = tokens;
    v.gammas = gammas;
    v.target_temperature = zero;
    v.batch = B;
    v.gamma_max = GMAX;
    v.vocab = V;
    v.accepted = accepted;
    v.emitted = emitted;
    v.emitted_count = count;
    v.flags = flags;
    CHECK(speckv_verify(ctx, &v));
    for (int b = 0; b < B; b++) {
        printf("verify b=%d accepted=%d flags=%u emitted=", b, accepted[b], flags[b]);
        for (int i = 0; i < count[b]; i++) printf("%s%d", i ? "," : "", emitted[b * (GMAX + 1) + i]);
        printf(" hazards=");
        for (int i = 0; i < gammas[b]; i++) printf("%s%.6f", i ? "," : "", hazards[b * SPECKV_STOP_TIMES + i]);
        printf("\n");
    }

    /* The next step's rule takes the calibrated scale: one for the batch... */
    CHECK(speckv_calibrate(&stop.odds_scale, hazards, gammas, accepted, B));
    printf("calibrated odds_scale=%.6f\n", stop.odds_scale);
    /* ...or one per sequence, each moved by its own drafts only (the batch's sequences are
     * different prompts): the next step sets stop.odds_scales = scales (on CUDA, a device copy). */
    float scales[B] = {1.0f, 1.0f, 1.0f};
    CHECK(speckv_calibrate_each(scales, hazards, gammas, accepted, B));
    for (int b = 0; b < B; b++) printf("calibrated each b=%d odds_scale=%.6f\n", b, scales[b]);
    speckv_context_destroy(ctx);
    return 0;
}
