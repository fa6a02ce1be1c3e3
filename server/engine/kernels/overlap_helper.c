/* The overlap helper of the routed kernel: one thread, pinned to CPUs the caller does not
 * compute on, that runs a layer's routed delta (routed_delta.c) while the caller runs the
 * layer's base matmul:
 *
 *   smolora_helper_submit(h, ..., x)   post the job (the helper picks it up at once)
 *   <base matmul into y>               the caller's own work
 *   smolora_helper_finish(h, y)        wait for the job, then y += delta
 *
 * The helper writes the delta to its own float32 buffer, so it never touches y while the
 * caller writes it; finish adds it (bfloat16: y = bf16(y + delta), as the in-place call does).
 * If the helper has not started the job when finish is called (it was asleep or descheduled),
 * the caller runs the job itself: waiting is never longer than doing the work. Either way the
 * arithmetic is the same, so the result does not depend on which thread ran it.
 * One job at a time. The helper sleeps on a condition variable until a job is posted, so it
 * uses its CPU only while it computes (a polling helper would take that CPU from the engine
 * core and API process that share it). It never enters OpenMP
 * (routed_delta.c's PFOR): libgomp would bind it to the worker's CPUs.
 * The handle belongs to the process that created it (threads do not survive fork). */

#define _GNU_SOURCE /* pthread_setaffinity_np, CPU_SET: the helper's pinning */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "routed_delta.h"

enum { JOB_EMPTY, JOB_POSTED, JOB_RUNNING, JOB_DONE };

typedef struct {
    int bf16;
    int64_t n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out;
    const int64_t *sub_row; const void *lora_a, *lora_b; const float *fuse_r;
    const int64_t *tok_slot; const float *tok_scale; const int64_t *tok_vu, *tok_if;
    float *fusion; int64_t fusion_stride;
    const void *x; int64_t x_stride;
    int64_t y_cols;
    int rc;
} helper_job;

typedef struct smolora_helper {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int state;
    _Atomic int sleeping;
    _Atomic int stop;
    _Atomic int64_t jobs_helper, jobs_caller;
    int64_t wait_ns, caller_ns;   /* caller side only: time finish waited for the helper / ran jobs itself */
    helper_job job;
    float *delta;
    size_t delta_cap;   /* floats */
} smolora_helper;

static void run_job(smolora_helper *h) {
    helper_job *j = &h->job;
    j->rc = routed_delta(j->bf16, j->n_tok, j->n_slot, j->n_sub, j->n_exp, j->rp, j->d_in, j->d_out, j->sub_row,
                         j->lora_a, j->lora_b, j->fuse_r, j->tok_slot, j->tok_scale, j->tok_vu, j->tok_if,
                         j->fusion, j->fusion_stride, INT64_MAX, j->x, j->x_stride, NULL, 0, h->delta);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *helper_main(void *arg) {
    smolora_helper *h = arg;
    for (;;) {
        pthread_mutex_lock(&h->mu);
        atomic_store(&h->sleeping, 1);
        while (atomic_load(&h->state) != JOB_POSTED && !atomic_load(&h->stop)) pthread_cond_wait(&h->cv, &h->mu);
        atomic_store(&h->sleeping, 0);
        pthread_mutex_unlock(&h->mu);
        if (atomic_load(&h->stop)) return NULL;
        int expected = JOB_POSTED;
        if (atomic_compare_exchange_strong(&h->state, &expected, JOB_RUNNING)) {
            run_job(h);
            atomic_fetch_add(&h->jobs_helper, 1);
            atomic_store(&h->state, JOB_DONE);
        }
    }
}

static void wake(smolora_helper *h) {
    if (atomic_load(&h->sleeping)) {
        pthread_mutex_lock(&h->mu);
        pthread_cond_signal(&h->cv);
        pthread_mutex_unlock(&h->mu);
    }
}

/* Start a helper pinned to cpus[0..n_cpus) (n_cpus 0: not pinned). NULL if it cannot start. */
smolora_helper *smolora_helper_start(const int64_t *cpus, int64_t n_cpus) {
    smolora_helper *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (n_cpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int64_t i = 0; i < n_cpus; ++i)
            if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET((int)cpus[i], &set);
        pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    }
    const int err = pthread_create(&h->thread, &attr, helper_main, h);
    pthread_attr_destroy(&attr);
    if (err) { free(h); return NULL; }
    return h;
}

void smolora_helper_stop(smolora_helper *h) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    atomic_store(&h->stop, 1);
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->thread, NULL);
    free(h->delta);
    free(h);
}

/* out[0..4): jobs run so far by the helper thread, jobs callers ran (finish found them not
 * started), nanoseconds callers waited in finish for the helper, nanoseconds they ran jobs. */
void smolora_helper_counts(smolora_helper *h, int64_t *out) {
    out[0] = atomic_load(&h->jobs_helper);
    out[1] = atomic_load(&h->jobs_caller);
    out[2] = h->wait_ns;
    out[3] = h->caller_ns;
}

/* Post one routed-delta job (the arguments of smolora_routed_delta_*, without y). The tensors
 * must stay alive and unchanged until smolora_helper_finish returns. Returns 0, 1 for a rank
 * above MAX_RANK, 3 when out of memory, 4 when a job is already pending. */
int smolora_helper_submit(
    smolora_helper *h, int64_t bf16, int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp,
    int64_t d_in, int64_t d_out, const int64_t *sub_row, const void *lora_a, const void *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work, const void *x, int64_t x_stride)
{
    (void)min_parallel_work;  /* the helper runs single-threaded */
    if (atomic_load(&h->state) != JOB_EMPTY) return 4;
    if (rp > MAX_RANK) return 1;
    const int64_t y_cols = delta_cols(n_sub, sub_row, d_out);
    const size_t need = (size_t)(n_tok * y_cols);
    if (need > h->delta_cap) {
        float *grown = realloc(h->delta, need * sizeof *grown);
        if (!grown) return 3;
        h->delta = grown;
        h->delta_cap = need;
    }
    h->job = (helper_job){(int)bf16, n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out, sub_row, lora_a, lora_b, fuse_r,
                          tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride, x, x_stride, y_cols, 0};
    atomic_store(&h->state, JOB_POSTED);
    wake(h);
    return 0;
}

/* Wait for the pending job (or run it here if the helper has not started it) and add its
 * delta to y (the model dtype; row stride y_stride elements). y NULL: only wait (a caller
 * abandoning the job). Returns the job's code (0 ok, see smolora_routed_delta_*), 5 if no job
 * was pending. */
int smolora_helper_finish(smolora_helper *h, void *y, int64_t y_stride) {
    int expected = JOB_POSTED;
    const int64_t t0 = now_ns();
    if (atomic_compare_exchange_strong(&h->state, &expected, JOB_RUNNING)) {
        run_job(h);
        atomic_fetch_add(&h->jobs_caller, 1);
        h->caller_ns += now_ns() - t0;
    } else if (expected == JOB_EMPTY) {
        return 5;
    } else {
        while (atomic_load_explicit(&h->state, memory_order_acquire) != JOB_DONE) {
#ifdef __x86_64__
            __builtin_ia32_pause();
#endif
        }
        h->wait_ns += now_ns() - t0;
    }
    const helper_job *j = &h->job;
    const int rc = j->rc;
    if (rc == 0 && y) add_delta_rows(j->bf16, j->n_tok, j->n_sub, j->d_out, j->sub_row, j->tok_scale, h->delta, j->y_cols, y, y_stride, 0);
    atomic_store(&h->state, JOB_EMPTY);
    return rc;
}
