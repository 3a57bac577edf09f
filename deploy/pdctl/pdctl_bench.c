/* pdctl_bench.c: `pdctl bench`, a load generator for a running router through its native API (protobuf over
 * ZeroMQ, router/rt_native.h). Open-loop Poisson arrivals (or all at once), prompt and output lengths fixed,
 * uniform or from a JSONL file; reports TTFT, inter-token latency and end-to-end latency percentiles, output
 * tokens/s, requests/s and goodput under TTFT / ITL limits, as text or one JSON object.
 * Synthetic prompts are token ids (no tokenizer needed here); every request sets ignore_eos so output lengths
 * are what was asked. Timing is taken when frames arrive at this process: it includes the client's own
 * queueing, which is why the client does nothing but send and receive. */
#define _GNU_SOURCE /* getline, strdup */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "pb.h"
#include "pd_common.h"
#include "pdctl.h"

typedef struct {
    int kind; /* 0 fixed, 1 uniform */
    int64_t a, b;
} bench_dist_t;

typedef struct {
    const char *api, *prompts_path;
    double rate, temperature, ttft_slo_ms, itl_slo_ms;
    int64_t n_requests, concurrency, seed, timeout_ms;
    bench_dist_t prompt_len, output_len;
    bool is_json, is_chat, is_ignore_eos_off;
} bench_opts_t;

typedef struct {
    char *text;         /* JSONL prompt, or NULL: token ids */
    int32_t n_prompt;   /* synthetic prompt length */
    int32_t max_tokens; /* output length asked */
    uint64_t t_due_us;  /* planned send time (offset from start) */
    uint64_t t_send, t_first, t_last, t_end;
    int32_t n_out;
    double itl_sum_us;
    int32_t n_itl;
    bool is_sent, is_done, is_ok;
    int err_code;
} bench_req_t;

typedef struct {
    double *v;
    size_t n, cap;
} bench_vec_t;

static void s_vec_push(bench_vec_t *x, double v) {
    if (x->n == x->cap) {
        x->cap = x->cap ? 2 * x->cap : 1024;
        x->v = pd_xrealloc(x->v, x->cap * sizeof *x->v);
    }
    x->v[x->n++] = v;
}

static int s_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted vector (0 when empty). */
static double s_pct(const bench_vec_t *x, double p) {
    if (x->n == 0) return 0;
    size_t k = (size_t)ceil(p / 100.0 * (double)x->n);
    return x->v[k == 0 ? 0 : k - 1];
}

static uint64_t s_rng_next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double s_rng_unit(uint64_t *s) {
    return (double)(s_rng_next(s) >> 11) * 0x1.0p-53;
}

static int64_t s_draw(const bench_dist_t *d, uint64_t *rng) {
    if (d->kind == 0) return d->a;
    return d->a + (int64_t)(s_rng_next(rng) % (uint64_t)(d->b - d->a + 1));
}

/* "N", "fixed:N" or "uniform:A:B". */
static bool s_parse_dist(const char *flag, const char *v, bench_dist_t *d) {
    long long a = 0, b = 0;
    char tail;
    if (v && (sscanf(v, "uniform:%lld:%lld%c", &a, &b, &tail) == 2) && a >= 1 && b >= a && b <= 1000000) {
        *d = (bench_dist_t){1, a, b};
        return true;
    }
    if (v && (sscanf(v, "fixed:%lld%c", &a, &tail) == 1 || sscanf(v, "%lld%c", &a, &tail) == 1) && a >= 1 &&
        a <= 1000000) {
        *d = (bench_dist_t){0, a, a};
        return true;
    }
    fprintf(stderr, "pdctl bench: %s: '%s' must be N, fixed:N or uniform:A:B with 1 <= A <= B\n", flag, v ? v : "");
    return false;
}

static void s_help(void) {
    printf("usage: pdctl bench [options]   (load generator against a running router's native API)\n"
           "  --api ENDPOINT        router native API (default tcp://127.0.0.1:5551)\n"
           "  --requests N          requests to send (default 64)\n"
           "  --rate R              Poisson arrivals, requests/s; 0 = all at once (default 0)\n"
           "  --concurrency C       most requests in flight; 0 = unbounded (default 0)\n"
           "  --prompt-len D        synthetic prompt tokens: N, fixed:N or uniform:A:B (default 128)\n"
           "  --output-len D        output tokens (ignore_eos): N, fixed:N or uniform:A:B (default 64)\n"
           "  --prompts FILE        JSONL, one {\"prompt\": TEXT, \"max_tokens\": N?} per line, used in turn\n"
           "  --chat                send each JSONL prompt as the user message of a chat (the model's template)\n"
           "  --no-ignore-eos       let requests end at end-of-generation (default: exactly the output length)\n"
           "  --temperature T       sampling temperature (default 0 = greedy)\n"
           "  --seed S              arrivals, lengths and token ids (default 1)\n"
           "  --ttft-slo MS         goodput: time to first token limit (default 1000)\n"
           "  --itl-slo MS          goodput: mean inter-token latency limit (default 100)\n"
           "  --timeout MS          per-request deadline sent to the router (default 600000)\n"
           "  --json                one JSON object on stdout instead of the text report\n");
}

static int s_parse(int argc, char **argv, bench_opts_t *o, bool *done) {
    *done = false;
    *o = (bench_opts_t){.api = "tcp://127.0.0.1:5551",
                        .n_requests = 64,
                        .seed = 1,
                        .ttft_slo_ms = 1000,
                        .itl_slo_ms = 100,
                        .timeout_ms = 600000,
                        .prompt_len = {0, 128, 128},
                        .output_len = {0, 64, 64}};
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true, takes = true;
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            s_help();
            *done = true;
            return 0;
        } else if (!strcmp(f, "--chat")) {
            o->is_chat = true, takes = false;
        } else if (!strcmp(f, "--no-ignore-eos")) {
            o->is_ignore_eos_off = true, takes = false;
        } else if (!strcmp(f, "--json")) {
            o->is_json = true, takes = false;
        } else if (!v) {
            fprintf(stderr, "pdctl bench: %s needs a value (or unknown option)\n", f);
            return 2;
        } else if (!strcmp(f, "--api")) {
            o->api = v;
        } else if (!strcmp(f, "--prompts")) {
            o->prompts_path = v;
        } else if (!strcmp(f, "--requests")) {
            ok = pdctl_parse_i64(f, v, 1, 1000000, &o->n_requests);
        } else if (!strcmp(f, "--concurrency")) {
            ok = pdctl_parse_i64(f, v, 0, 1000000, &o->concurrency);
        } else if (!strcmp(f, "--seed")) {
            ok = pdctl_parse_i64(f, v, 0, INT64_MAX, &o->seed);
        } else if (!strcmp(f, "--timeout")) {
            ok = pdctl_parse_i64(f, v, 1, 3600000, &o->timeout_ms);
        } else if (!strcmp(f, "--rate")) {
            ok = pdctl_parse_f64(f, v, 0, 1e6, &o->rate);
        } else if (!strcmp(f, "--temperature")) {
            ok = pdctl_parse_f64(f, v, 0, 100, &o->temperature);
        } else if (!strcmp(f, "--ttft-slo")) {
            ok = pdctl_parse_f64(f, v, 0, 1e9, &o->ttft_slo_ms);
        } else if (!strcmp(f, "--itl-slo")) {
            ok = pdctl_parse_f64(f, v, 0, 1e9, &o->itl_slo_ms);
        } else if (!strcmp(f, "--prompt-len")) {
            ok = s_parse_dist(f, v, &o->prompt_len);
        } else if (!strcmp(f, "--output-len")) {
            ok = s_parse_dist(f, v, &o->output_len);
        } else {
            fprintf(stderr, "pdctl bench: unknown option %s (see --help)\n", f);
            return 2;
        }
        if (!ok) return 2;
        if (takes) i++;
    }
    return 0;
}

/* Reads a JSONL prompt file into reqs (in turn). false + message on a bad line. */
static bool s_load_prompts(const char *path, bench_req_t *reqs, int64_t n) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "pdctl bench: cannot open %s\n", path);
        return false;
    }
    char **texts = NULL;
    int32_t *max_toks = NULL;
    size_t n_lines = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    bool ok = true;
    while (ok && (len = getline(&line, &cap, f)) > 0) {
        if (len <= 1) continue;
        json_error_t je;
        json_t *j = json_loadb(line, (size_t)len, JSON_REJECT_DUPLICATES, &je);
        json_t *p = j ? json_object_get(j, "prompt") : NULL, *m = j ? json_object_get(j, "max_tokens") : NULL;
        if (!json_is_string(p) || (m && (!json_is_integer(m) || json_integer_value(m) < 1))) {
            fprintf(stderr,
                    "pdctl bench: %s line %zu: need {\"prompt\": string, \"max_tokens\": int >= 1 (optional)}\n", path,
                    n_lines + 1);
            ok = false;
        } else {
            texts = pd_xrealloc(texts, (n_lines + 1) * sizeof *texts);
            max_toks = pd_xrealloc(max_toks, (n_lines + 1) * sizeof *max_toks);
            texts[n_lines] = strdup(json_string_value(p));
            max_toks[n_lines++] = m ? (int32_t)json_integer_value(m) : 0;
        }
        json_decref(j);
    }
    free(line);
    fclose(f);
    if (ok && n_lines == 0) {
        fprintf(stderr, "pdctl bench: %s has no prompts\n", path);
        ok = false;
    }
    for (int64_t i = 0; ok && i < n; i++) {
        reqs[i].text = strdup(texts[i % (int64_t)n_lines]);
        if (max_toks[i % (int64_t)n_lines] > 0) reqs[i].max_tokens = max_toks[i % (int64_t)n_lines];
    }
    for (size_t i = 0; i < n_lines; i++) free(texts[i]);
    free(texts);
    free(max_toks);
    return ok;
}

static bool s_send(void *sock, const bench_opts_t *o, bench_req_t *r, uint64_t id, uint64_t *rng) {
    Pdserve__V1__GenerateRequest g = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    Pdserve__V1__TokenIds ids = PDSERVE__V1__TOKEN_IDS__INIT;
    int32_t *tok = NULL;
    g.request_id = id;
    g.max_tokens = (uint32_t)r->max_tokens;
    g.stream = true;
    g.ignore_eos = !o->is_ignore_eos_off;
    g.timeout_ms = (uint32_t)o->timeout_ms;
    sp.temperature = (float)o->temperature;
    sp.seed = id;
    sp.has_seed = true;
    g.sampling = &sp;
    Pdserve__V1__ChatMessages chat = PDSERVE__V1__CHAT_MESSAGES__INIT;
    Pdserve__V1__ChatMessage msg = PDSERVE__V1__CHAT_MESSAGE__INIT, *pmsg = &msg;
    if (r->text && o->is_chat) {
        msg.role = "user";
        msg.content = r->text;
        chat.n_messages = 1;
        chat.messages = &pmsg;
        g.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT;
        g.chat = &chat;
    } else if (r->text) {
        g.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
        g.text = r->text;
    } else {
        tok = pd_xmalloc((size_t)r->n_prompt * sizeof *tok);
        for (int32_t i = 0; i < r->n_prompt; i++) tok[i] = 300 + (int32_t)(s_rng_next(rng) % 20000); /* plain words */
        ids.n_ids = (size_t)r->n_prompt;
        ids.ids = tok;
        g.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
        g.token_ids = &ids;
    }
    Pdserve__V1__ClientMessage cm = PDSERVE__V1__CLIENT_MESSAGE__INIT;
    cm.body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY_GENERATE;
    cm.generate = &g;
    size_t n = pdserve__v1__client_message__get_packed_size(&cm);
    uint8_t *buf = pd_xmalloc(n);
    pdserve__v1__client_message__pack(&cm, buf);
    int rc = zmq_send(sock, buf, n, 0);
    free(buf);
    free(tok);
    r->t_send = pd_now_us();
    r->is_sent = true;
    return rc >= 0;
}

/* One chunk: timestamps per token-bearing chunk; a chunk of k tokens counts as k inter-token gaps of
 * (gap / k), which is what a client reading tokens sees on average. */
static void s_on_chunk(bench_req_t *reqs, int64_t n, const Pdserve__V1__ResponseChunk *c, bench_vec_t *itl) {
    if (c->request_id < 1 || (int64_t)c->request_id > n) return;
    bench_req_t *r = &reqs[c->request_id - 1];
    if (r->is_done) return;
    uint64_t now = pd_now_us();
    int32_t k = (int32_t)c->n_token_ids;
    if (k > 0) {
        if (r->n_out == 0) {
            r->t_first = now;
        } else {
            double gap = (double)(now - r->t_last) / k;
            for (int32_t i = 0; i < k; i++) s_vec_push(itl, gap);
            r->itl_sum_us += (double)(now - r->t_last);
            r->n_itl += k;
        }
        r->t_last = now;
        r->n_out += k;
    }
    if (c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE) {
        r->is_done = true;
        r->t_end = now;
        r->is_ok = c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_STOP ||
                   c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH;
        r->err_code = c->error ? (int)c->error->code : 0;
    }
}

static void s_report(const bench_opts_t *o, bench_req_t *reqs, int64_t n, bench_vec_t *itl, double wall_s) {
    bench_vec_t ttft = {0}, e2e = {0};
    int64_t n_ok = 0, n_good = 0, out_tokens = 0, errs[16] = {0};
    /* decode speed of one sequence: tokens after the first over the time from first to last (prefill excluded) */
    double dec_tokens = 0, dec_s = 0;
    for (int64_t i = 0; i < n; i++) {
        bench_req_t *r = &reqs[i];
        if (!r->is_ok) {
            if (r->is_done) errs[r->err_code >= 0 && r->err_code < 16 ? r->err_code : 15]++;
            continue;
        }
        n_ok++;
        out_tokens += r->n_out;
        if (r->n_out >= 2) dec_tokens += r->n_out - 1, dec_s += (double)(r->t_last - r->t_first) / 1e6;
        double t = r->n_out ? (double)(r->t_first - r->t_send) / 1000.0 : 0;
        s_vec_push(&ttft, t);
        s_vec_push(&e2e, (double)(r->t_end - r->t_send) / 1000.0);
        double mean_itl = r->n_itl ? r->itl_sum_us / r->n_itl / 1000.0 : 0;
        if (t <= o->ttft_slo_ms && mean_itl <= o->itl_slo_ms) n_good++;
    }
    for (size_t i = 0; i < itl->n; i++) itl->v[i] /= 1000.0;
    qsort(ttft.v, ttft.n, sizeof(double), s_cmp);
    qsort(e2e.v, e2e.n, sizeof(double), s_cmp);
    qsort(itl->v, itl->n, sizeof(double), s_cmp);
    double tps = out_tokens / wall_s, rps = n_ok / wall_s, goodput = n_good / wall_s;
    double dec_tps = dec_s > 0 ? dec_tokens / dec_s : 0;
    if (o->is_json) {
        printf("{\"requests\": %lld, \"ok\": %lld, \"failed\": %lld, \"duration_s\": %.3f, \"rate\": %g, "
               "\"output_tokens\": %lld, \"output_tokens_per_s\": %.2f, \"decode_tokens_per_s_per_seq\": %.2f, "
               "\"requests_per_s\": %.3f, "
               "\"goodput_requests_per_s\": %.3f, \"ttft_slo_ms\": %g, \"itl_slo_ms\": %g, "
               "\"ttft_ms\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f}, "
               "\"itl_ms\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f}, "
               "\"e2e_ms\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f}, \"errors_by_code\": {",
               (long long)n, (long long)n_ok, (long long)(n - n_ok), wall_s, o->rate, (long long)out_tokens, tps,
               dec_tps, rps, goodput, o->ttft_slo_ms, o->itl_slo_ms, s_pct(&ttft, 50), s_pct(&ttft, 90),
               s_pct(&ttft, 99), s_pct(itl, 50), s_pct(itl, 90), s_pct(itl, 99), s_pct(&e2e, 50), s_pct(&e2e, 90),
               s_pct(&e2e, 99));
        bool first = true;
        for (int i = 0; i < 16; i++)
            if (errs[i]) printf("%s\"%d\": %lld", first ? "" : ", ", i, (long long)errs[i]), first = false;
        printf("}}\n");
    } else {
        printf("requests %lld ok %lld failed %lld in %.2f s (rate %s)\n", (long long)n, (long long)n_ok,
               (long long)(n - n_ok), wall_s, o->rate > 0 ? "poisson" : "all at once");
        printf("output %.1f tok/s, %.2f req/s, goodput %.2f req/s (ttft <= %g ms, mean itl <= %g ms)\n", tps, rps,
               goodput, o->ttft_slo_ms, o->itl_slo_ms);
        printf("decode %.1f tok/s per sequence (first to last token)\n", dec_tps);
        printf("ttft ms  p50 %8.1f  p90 %8.1f  p99 %8.1f\n", s_pct(&ttft, 50), s_pct(&ttft, 90), s_pct(&ttft, 99));
        printf("itl  ms  p50 %8.1f  p90 %8.1f  p99 %8.1f\n", s_pct(itl, 50), s_pct(itl, 90), s_pct(itl, 99));
        printf("e2e  ms  p50 %8.1f  p90 %8.1f  p99 %8.1f\n", s_pct(&e2e, 50), s_pct(&e2e, 90), s_pct(&e2e, 99));
        for (int i = 0; i < 16; i++)
            if (errs[i]) printf("errors with code %d: %lld\n", i, (long long)errs[i]);
    }
    free(ttft.v);
    free(e2e.v);
}

int pdctl_bench(int argc, char **argv) {
    bench_opts_t o;
    bool done;
    int rc = s_parse(argc, argv, &o, &done);
    if (rc || done) return rc;
    uint64_t rng = (uint64_t)o.seed;
    bench_req_t *reqs = pd_xcalloc((size_t)o.n_requests, sizeof *reqs);
    uint64_t t = 0;
    for (int64_t i = 0; i < o.n_requests; i++) {
        reqs[i].n_prompt = (int32_t)s_draw(&o.prompt_len, &rng);
        reqs[i].max_tokens = (int32_t)s_draw(&o.output_len, &rng);
        if (o.rate > 0) t += (uint64_t)(-log(1.0 - s_rng_unit(&rng)) / o.rate * 1e6);
        reqs[i].t_due_us = t;
    }
    void *zctx = zmq_ctx_new(), *sock = zmq_socket(zctx, ZMQ_DEALER);
    int linger = 0, hwm = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    bench_vec_t itl = {0};
    rc = 1;
    if (o.prompts_path && !s_load_prompts(o.prompts_path, reqs, o.n_requests)) goto fail;
    if (zmq_connect(sock, o.api) != 0) {
        fprintf(stderr, "pdctl bench: cannot connect to %s: %s\n", o.api, zmq_strerror(zmq_errno()));
        goto fail;
    }
    uint64_t start = pd_now_us(), give_up = start + (uint64_t)o.timeout_ms * 1000u +
                                            5000000u; /* the router ends every request by its deadline */
    int64_t next = 0, n_done = 0, in_flight = 0;
    while (n_done < o.n_requests && pd_now_us() < give_up) {
        uint64_t now = pd_now_us();
        while (next < o.n_requests && start + reqs[next].t_due_us <= now &&
               (o.concurrency == 0 || in_flight < o.concurrency)) {
            if (!s_send(sock, &o, &reqs[next], (uint64_t)next + 1, &rng)) {
                fprintf(stderr, "pdctl bench: send failed: %s\n", zmq_strerror(zmq_errno()));
                goto fail;
            }
            next++, in_flight++;
        }
        long wait_ms = 100;
        if (next < o.n_requests && (o.concurrency == 0 || in_flight < o.concurrency)) {
            uint64_t due = start + reqs[next].t_due_us;
            wait_ms = due <= now ? 0 : (long)((due - now) / 1000);
        }
        zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, wait_ms) <= 0) continue;
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) >= 0) {
            Pdserve__V1__ResponseChunk *c = NULL;
            if (pb_unpack_response_chunk(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL, &c, NULL, 0) == PD_OK) {
                bool was_done =
                    c->request_id >= 1 && (int64_t)c->request_id <= o.n_requests && reqs[c->request_id - 1].is_done;
                s_on_chunk(reqs, o.n_requests, c, &itl);
                if (!was_done && c->request_id >= 1 && (int64_t)c->request_id <= o.n_requests &&
                    reqs[c->request_id - 1].is_done)
                    n_done++, in_flight--;
                pdserve__v1__response_chunk__free_unpacked(c, NULL);
            }
        }
        zmq_msg_close(&m);
    }
    if (n_done < o.n_requests)
        fprintf(stderr, "pdctl bench: %lld requests never finished\n", (long long)(o.n_requests - n_done));
    s_report(&o, reqs, o.n_requests, &itl, (double)(pd_now_us() - start) / 1e6);
    rc = n_done == o.n_requests ? 0 : 1;
fail:
    for (int64_t i = 0; i < o.n_requests; i++) free(reqs[i].text);
    free(reqs);
    free(itl.v);
    zmq_close(sock);
    zmq_ctx_term(zctx);
    return rc;
}
