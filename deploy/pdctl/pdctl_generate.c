/* pdctl_generate.c: `pdctl generate`: one prompt through the engine in this process, the completion
 * streamed to stdout as it is sampled, statistics to stderr. Exercises the same pieces the services
 * use: tokenizer, chat template, paged KV, batched forward, sampler, stop strings, streaming detok. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "eng_sample.h"
#include "eng_stop.h"
#include "pd_log.h"
#include "pdctl.h"

typedef struct {
    const char *model, *prompt, *system;
    bool chat, special, ignore_eos, verbose;
    int64_t max_tokens, threads, gpu;
    bool is_cuda;
    const char *stops[ENG_STOP_MAX];
    int n_stops;
    eng_sampling_t sampling;
} gen_opts_t;

static void s_help(void) {
    printf("usage: pdctl generate --prompt TEXT [options]\n"
           "  --model PATH              GGUF model (default %s)\n"
           "  --prompt TEXT             prompt text (required)\n"
           "  --chat                    wrap the prompt as a user message in the model's chat template\n"
           "  --system TEXT             system message (with --chat)\n"
           "  --special                 parse special-token text such as <|im_start|> in a raw prompt\n"
           "  --max-tokens N            tokens to generate, 1..1048576 (default 128)\n"
           "  --temperature T           0 = greedy, up to 100 (default 0.8)\n"
           "  --top-k K                 0 = off (default 40)\n"
           "  --top-p P                 (0, 1] (default 0.95)\n"
           "  --min-p P                 [0, 1] (default 0.05)\n"
           "  --repetition-penalty R    (0, 10] (default 1 = off)\n"
           "  --presence-penalty P      [-2, 2] (default 0)\n"
           "  --frequency-penalty F     [-2, 2] (default 0)\n"
           "  --seed S                  sampling seed (default: from the clock)\n"
           "  --stop TEXT               stop string, repeatable up to %d times\n"
           "  --logprobs N              print the top-N logprobs of each token to stderr, 0..%d\n"
           "  --ignore-eos              keep generating past end-of-generation tokens\n"
           "  --threads N               compute threads (default: one per core)\n"
           "  --backend cpu|cuda        compute backend (default cpu; cuda needs -DPDSERVE_CUDA=ON)\n"
           "  --gpu N                   CUDA device index (default 0)\n"
           "  --verbose                 engine log lines on stderr\n",
           pdctl_default_model(), ENG_STOP_MAX, ENG_MAX_LOGPROBS);
}

/* Returns 0 to go on, or an exit code (0 for --help, 2 for a usage error). */
static int s_parse(int argc, char **argv, gen_opts_t *o, bool *done) {
    *done = false;
    o->model = pdctl_default_model();
    o->max_tokens = 128;
    o->sampling = eng_sampling_default();
    o->sampling.temperature = 0.8f, o->sampling.top_k = 40, o->sampling.top_p = 0.95f, o->sampling.min_p = 0.05f;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t iv;
        double dv;
#define NEED_VALUE                                                \
    if (!v) {                                                     \
        fprintf(stderr, "pdctl generate: %s needs a value\n", f); \
        return 2;                                                 \
    }                                                             \
    i++;
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            s_help();
            *done = true;
            return 0;
        } else if (!strcmp(f, "--chat"))
            o->chat = true;
        else if (!strcmp(f, "--special"))
            o->special = true;
        else if (!strcmp(f, "--ignore-eos"))
            o->ignore_eos = true;
        else if (!strcmp(f, "--verbose"))
            o->verbose = true;
        else if (!strcmp(f, "--model")) {
            NEED_VALUE o->model = v;
        } else if (!strcmp(f, "--prompt")) {
            NEED_VALUE o->prompt = v;
        } else if (!strcmp(f, "--system")) {
            NEED_VALUE o->system = v;
        } else if (!strcmp(f, "--stop")) {
            NEED_VALUE
            if (o->n_stops == ENG_STOP_MAX) {
                fprintf(stderr, "pdctl generate: at most %d --stop strings\n", ENG_STOP_MAX);
                return 2;
            }
            o->stops[o->n_stops++] = v;
        } else if (!strcmp(f, "--max-tokens")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 1, 1 << 20, &o->max_tokens)) return 2;
        } else if (!strcmp(f, "--threads")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 1, 1024, &o->threads)) return 2;
        } else if (!strcmp(f, "--gpu")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 0, 64, &o->gpu)) return 2;
        } else if (!strcmp(f, "--backend")) {
            NEED_VALUE if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
                fprintf(stderr, "pdctl generate: --backend is cpu or cuda, not '%s'\n", v);
                return 2;
            }
            o->is_cuda = !strcmp(v, "cuda");
        } else if (!strcmp(f, "--top-k")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 0, 1 << 30, &iv)) return 2;
            o->sampling.top_k = (int32_t)iv;
        } else if (!strcmp(f, "--logprobs")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 0, ENG_MAX_LOGPROBS, &iv)) return 2;
            o->sampling.n_logprobs = (int32_t)iv;
        } else if (!strcmp(f, "--seed")) {
            NEED_VALUE if (!pdctl_parse_i64(f, v, 0, INT64_MAX, &iv)) return 2;
            o->sampling.seed = (uint64_t)iv;
            o->sampling.has_seed = true;
        } else if (!strcmp(f, "--temperature")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, 0, 100, &dv)) return 2;
            o->sampling.temperature = (float)dv;
        } else if (!strcmp(f, "--top-p")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, 1e-9, 1, &dv)) return 2;
            o->sampling.top_p = (float)dv;
        } else if (!strcmp(f, "--min-p")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, 0, 1, &dv)) return 2;
            o->sampling.min_p = (float)dv;
        } else if (!strcmp(f, "--repetition-penalty")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, 1e-9, 10, &dv)) return 2;
            o->sampling.repetition_penalty = (float)dv;
        } else if (!strcmp(f, "--presence-penalty")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, -2, 2, &dv)) return 2;
            o->sampling.presence_penalty = (float)dv;
        } else if (!strcmp(f, "--frequency-penalty")) {
            NEED_VALUE if (!pdctl_parse_f64(f, v, -2, 2, &dv)) return 2;
            o->sampling.frequency_penalty = (float)dv;
        } else {
            fprintf(stderr, "pdctl generate: unknown option '%s' (see --help)\n", f);
            return 2;
        }
#undef NEED_VALUE
    }
    if (!o->prompt) {
        fprintf(stderr, "pdctl generate: --prompt is required (see --help)\n");
        return 2;
    }
    if (o->system && !o->chat) {
        fprintf(stderr, "pdctl generate: --system needs --chat\n");
        return 2;
    }
    char err[256];
    if (eng_sampling_validate(&o->sampling, err, sizeof err) != PD_OK) {
        fprintf(stderr, "pdctl generate: %s\n", err);
        return 2;
    }
    return 0;
}

/* Prompt text -> token ids (chat template, BOS). Returns count or -1 (message printed). */
static int64_t s_tokenize(eng_t *e, const gen_opts_t *o, int32_t **out) {
    const eng_tok_t *tok = eng_tokenizer(e);
    char *text = NULL;
    const char *src = o->prompt;
    if (o->chat) {
        if (!eng_chat(e)) {
            fprintf(stderr, "pdctl generate: this model has no chat template we can render; drop --chat\n");
            return -1;
        }
        eng_chat_msg_t msgs[2];
        int n = 0;
        if (o->system) msgs[n++] = (eng_chat_msg_t){"system", o->system};
        msgs[n++] = (eng_chat_msg_t){"user", o->prompt};
        int64_t len = eng_chat_render(eng_chat(e), msgs, n, true, NULL, 0);
        if (len < 0) return -1;
        text = pd_xmalloc((size_t)len + 1);
        if (eng_chat_render(eng_chat(e), msgs, n, true, text, (size_t)len + 1) != len) return -1;
        src = text;
    }
    bool special = o->chat || o->special;
    int64_t n = eng_tok_encode(tok, src, strlen(src), special, NULL, 0);
    int64_t bos = eng_tok_add_bos(tok) && eng_tok_bos(tok) >= 0;
    int32_t *ids = n >= 0 ? pd_xmalloc(sizeof(int32_t) * (size_t)(n + bos + 1)) : NULL;
    if (ids && bos) ids[0] = eng_tok_bos(tok);
    if (ids && eng_tok_encode(tok, src, strlen(src), special, ids + bos, n) != n) n = -1;
    free(text);
    if (n < 0) {
        fprintf(stderr, "pdctl generate: tokenization failed\n");
        free(ids);
        return -1;
    }
    *out = ids;
    return n + bos;
}

/* Runs tokens [0, n) of a sequence through the engine from position pos, in chunks that fit a batch;
 * logits of the last token land in logits. */
static pd_status s_feed(eng_t *e, eng_kv_seq_t *seq, const int32_t *tokens, int32_t n, int32_t pos, float *logits) {
    pd_status st = eng_kv_seq_reserve(seq, eng_kv_pool(e), eng_kv_layout(e)->block_size, pos + n);
    if (st != PD_OK) return st;
    for (int32_t done = 0; done < n;) {
        int32_t chunk = n - done < eng_max_batch_tokens(e) ? n - done : eng_max_batch_tokens(e);
        int32_t p = pos + done;
        const int32_t *table = seq->blocks;
        eng_batch_t b = {.n_seqs = 1,
                         .n_tokens = &chunk,
                         .pos = &p,
                         .block_tables = &table,
                         .n_blocks = &seq->n_blocks,
                         .tokens = tokens + done,
                         .want_logits = NULL,
                         .logits = logits};
        st = eng_forward(e, &b);
        if (st != PD_OK) return st;
        done += chunk;
    }
    return PD_OK;
}

static void s_print_logprobs(const eng_tok_t *tok, const eng_sample_result_t *r) {
    size_t len;
    const char *piece = eng_tok_piece(tok, r->token, &len);
    fprintf(stderr, "[%d %.*s lp=%.4f |", r->token, (int)len, piece, r->logprob);
    for (int i = 0; i < r->n_top; i++) fprintf(stderr, " %d:%.4f", r->top[i].token, r->top[i].logprob);
    fprintf(stderr, "]\n");
}

static int s_run(eng_t *e, const gen_opts_t *o) {
    const eng_tok_t *tok = eng_tokenizer(e);
    const eng_model_config_t *c = eng_config(e);
    int32_t *prompt = NULL;
    int64_t n_prompt = s_tokenize(e, o, &prompt);
    if (n_prompt < 0) return 1;
    if (n_prompt == 0 || n_prompt >= c->ctx_len) {
        fprintf(stderr, "pdctl generate: prompt has %lld tokens; allowed 1..%d\n", (long long)n_prompt, c->ctx_len - 1);
        free(prompt);
        return 2;
    }
    char err[256];
    eng_sampler_t *sampler = eng_sampler_create(&o->sampling, c->vocab_size);
    eng_stop_t *stop = eng_stop_create(o->stops, o->n_stops, err, sizeof err);
    float *logits = pd_xmalloc(sizeof(float) * (size_t)c->vocab_size);
    size_t text_cap = eng_detok_max_bytes(tok) + ENG_STOP_MAX_BYTES + 64;
    char *piece = pd_xmalloc(text_cap), *text = pd_xmalloc(text_cap * 2);
    eng_kv_seq_t seq = {0};
    eng_detok_t detok;
    eng_detok_init(&detok);
    int rc = 1;
    if (!sampler || !stop) {
        fprintf(stderr, "pdctl generate: %s\n", stop ? "bad sampling parameters" : err);
        rc = 2;
        goto done;
    }
    eng_sampler_add_prompt(sampler, prompt, n_prompt);
    uint64_t t0 = pd_now_us();
    pd_status st = s_feed(e, &seq, prompt, (int32_t)n_prompt, 0, logits);
    uint64_t t_prefill = pd_now_us() - t0;
    const char *finish = "length";
    int64_t n_gen = 0, max_gen = o->max_tokens;
    if (n_prompt + max_gen > c->ctx_len) max_gen = c->ctx_len - n_prompt;
    bool hit = false;
    while (st == PD_OK && n_gen < max_gen) {
        eng_sample_result_t r;
        st = eng_sampler_sample(sampler, logits, &r);
        if (st != PD_OK) break;
        n_gen++;
        if (o->sampling.n_logprobs) s_print_logprobs(tok, &r);
        if (!o->ignore_eos && eng_tok_is_eog(tok, r.token)) {
            finish = "stop";
            break;
        }
        eng_sampler_add_generated(sampler, r.token);
        int64_t n_piece = eng_detok_push(&detok, tok, r.token, piece, text_cap);
        int64_t n_text = n_piece >= 0 ? eng_stop_feed(stop, piece, (size_t)n_piece, text, text_cap * 2, &hit) : -1;
        if (n_text < 0) {
            st = PD_EINVAL;
            break;
        }
        fwrite(text, 1, (size_t)n_text, stdout);
        fflush(stdout);
        if (hit) {
            finish = "stop";
            break;
        }
        if (n_gen == max_gen) break;
        st = s_feed(e, &seq, &r.token, 1, (int32_t)(n_prompt + n_gen - 1), logits);
    }
    if (!hit) {
        int64_t n = eng_detok_flush(&detok, piece, text_cap);
        bool hit2 = false;
        n = n > 0 ? eng_stop_feed(stop, piece, (size_t)n, text, text_cap * 2, &hit2) : 0;
        if (n > 0) fwrite(text, 1, (size_t)n, stdout);
        if (!hit2) {
            n = eng_stop_flush(stop, text, text_cap * 2);
            if (n > 0) fwrite(text, 1, (size_t)n, stdout);
        }
    }
    printf("\n");
    uint64_t t_total = pd_now_us() - t0;
    if (st != PD_OK) {
        fprintf(stderr, "pdctl generate: engine failed: %s\n", pd_strerror(st));
        goto done;
    }
    double dec_s = (double)(t_total - t_prefill) / 1e6;
    fprintf(stderr,
            "[prompt %lld tokens in %.3f s (%.1f tok/s); generated %lld tokens in %.3f s (%.1f tok/s); finish=%s]\n",
            (long long)n_prompt, (double)t_prefill / 1e6, (double)n_prompt / ((double)t_prefill / 1e6),
            (long long)n_gen, dec_s, n_gen > 1 ? (double)(n_gen - 1) / dec_s : 0.0, finish);
    rc = 0;
done:
    eng_kv_seq_release(&seq, eng_kv_pool(e));
    eng_kv_seq_fini(&seq);
    eng_sampler_destroy(&sampler);
    eng_stop_destroy(&stop);
    free(logits), free(piece), free(text), free(prompt);
    return rc;
}

int pdctl_generate(int argc, char **argv) {
    gen_opts_t o = {0};
    bool done;
    int rc = s_parse(argc, argv, &o, &done);
    if (rc || done) return rc;
    if (o.verbose) pd_log_set_level(PD_LOG_INFO);
    eng_params_t p = eng_params_default();
    p.model_path = o.model;
    p.n_threads = (int32_t)o.threads;
    p.backend = o.is_cuda ? ENG_BACKEND_CUDA : ENG_BACKEND_CPU;
    p.gpu = (int32_t)o.gpu;
    p.kv_mem_bytes = 256ull << 20;
    char err[512];
    eng_t *e = eng_create(&p, err, sizeof err);
    if (!e) {
        fprintf(stderr, "pdctl generate: %s\n", err);
        return 1;
    }
    rc = s_run(e, &o);
    eng_destroy(&e);
    return rc;
}
