/* test_eng_chat.c: chat template rendering against transformers' apply_chat_template (golden data in
 * tests/golden/tok/chat.txt, made by tests/golden/make_tok_golden.py): the real SmolLM2 GGUF template,
 * other spellings of ChatML, templates that must be refused, and the buffer contract. */
#include "eng_chat.h"
#include "eng_gguf.h"
#include "pd_common.h"
#include "pd_test.h"

#include <stdint.h>

#define S_MAX_MSGS 16

static eng_gguf_t *s_gguf;
static eng_chat_t *s_chat;

static int s_hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Hex text[0..n) -> malloc'd NUL-terminated bytes (caller frees), or NULL. */
static char *s_unhex(const char *text, size_t n) {
    if (n % 2) return NULL;
    char *dst = malloc(n / 2 + 1);
    for (size_t i = 0; i < n; i += 2) {
        int hi = s_hexval(text[i]), lo = s_hexval(text[i + 1]);
        if (hi < 0 || lo < 0) {
            free(dst);
            return NULL;
        }
        dst[i / 2] = (char)(hi << 4 | lo);
    }
    dst[n / 2] = '\0';
    return dst;
}

/* One case of chat.txt, being read. */
typedef struct {
    char name[128];
    bool gen;
    char *tmpl;
    eng_chat_msg_t msgs[S_MAX_MSGS];
    int n_msgs;
} s_case_t;

static void s_case_clear(s_case_t *c) {
    free(c->tmpl);
    for (int i = 0; i < c->n_msgs; i++) {
        free((char *)c->msgs[i].role);
        free((char *)c->msgs[i].content);
    }
    memset(c, 0, sizeof *c);
}

static void s_print_text(const char *label, const char *p, size_t n) {
    fprintf(stderr, "    %s (%zu bytes): \"", label, n);
    for (size_t i = 0; i < n && i < 400; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '\n')
            fputs("\\n", stderr);
        else if (ch < 0x20 || ch == '"')
            fprintf(stderr, "\\x%02x", ch);
        else
            fputc(ch, stderr);
    }
    fputs("\"\n", stderr);
}

/* Renders c and compares with want; returns true on a match. */
static bool s_run_case(const s_case_t *c, const char *want) {
    char err[256] = "";
    eng_chat_t *own = NULL;
    const eng_chat_t *chat = s_chat;
    if (c->tmpl) {
        own = eng_chat_create(s_gguf, c->tmpl, err, sizeof err);
        if (!own) {
            fprintf(stderr, "  case %s: template refused: %s\n", c->name, err);
            return false;
        }
        chat = own;
    }
    size_t n_want = strlen(want);
    int64_t n = eng_chat_render(chat, c->msgs, c->n_msgs, c->gen, NULL, 0); /* size query */
    char *out = malloc((size_t)(n > 0 ? n : 0) + 1);
    int64_t m = eng_chat_render(chat, c->msgs, c->n_msgs, c->gen, out, (size_t)n + 1);
    bool ok = n == (int64_t)n_want && m == n && memcmp(out, want, n_want) == 0 && out[n] == '\0';
    /* a short buffer gets a prefix and the full length */
    if (ok && n > 5) {
        char small[6];
        ok = eng_chat_render(chat, c->msgs, c->n_msgs, c->gen, small, 5) == n && memcmp(small, want, 5) == 0;
    }
    if (!ok) {
        fprintf(stderr, "  case %s (gen=%d) differs:\n", c->name, c->gen);
        s_print_text("want", want, n_want);
        if (m >= 0) s_print_text("got ", out, (size_t)m);
    }
    free(out);
    eng_chat_destroy(&own);
    return ok;
}

static void test_load(void) {
    char err[256] = "";
    const char *path = pd_test_model_path();
    s_gguf = eng_gguf_open(path, err, sizeof err);
    if (!s_gguf) fprintf(stderr, "model %s: %s\n", path, err);
    REQUIRE(s_gguf != NULL);
    s_chat = eng_chat_create(s_gguf, NULL, err, sizeof err);
    if (!s_chat) fprintf(stderr, "chat template: %s\n", err);
    REQUIRE(s_chat != NULL);
}

static void test_chat_golden(void) {
    REQUIRE(s_chat);
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/golden/tok/chat.txt", PD_SOURCE_DIR);
    size_t n;
    char *buf = pd_test_read_file(path, &n);
    if (!buf) fprintf(stderr, "cannot read %s\n", path);
    REQUIRE(buf);
    s_case_t c = {0};
    int n_cases = 0, n_bad = 0, n_rejects = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        char *sp = strchr(line, ' ');
        char *arg = sp ? sp + 1 : line + strlen(line);
        if (strncmp(line, "case ", 5) == 0) {
            s_case_clear(&c);
            int gen = 0;
            if (sscanf(arg, "%127s %d", c.name, &gen) != 2) n_bad++;
            c.gen = gen != 0;
        } else if (strncmp(line, "template ", 9) == 0) {
            c.tmpl = s_unhex(arg, strlen(arg));
        } else if (strncmp(line, "msg ", 4) == 0) {
            char *sp2 = strchr(arg, ' ');
            if (!sp2 || c.n_msgs >= S_MAX_MSGS) {
                n_bad++;
                continue;
            }
            c.msgs[c.n_msgs].role = s_unhex(arg, (size_t)(sp2 - arg));
            c.msgs[c.n_msgs].content = s_unhex(sp2 + 1, strlen(sp2 + 1));
            c.n_msgs++;
        } else if (strncmp(line, "expect ", 7) == 0) {
            char *want = s_unhex(arg, strlen(arg));
            n_cases++;
            if (!want || !s_run_case(&c, want)) n_bad++;
            free(want);
        } else if (strncmp(line, "reject ", 7) == 0) {
            char *tmpl = s_unhex(arg, strlen(arg));
            char err[256] = "";
            eng_chat_t *chat = tmpl ? eng_chat_create(s_gguf, tmpl, err, sizeof err) : NULL;
            n_rejects++;
            if (chat || !err[0]) {
                n_bad++;
                fprintf(stderr, "  template should be refused: %.80s\n", tmpl ? tmpl : "(bad hex)");
            }
            eng_chat_destroy(&chat);
            free(tmpl);
        } else {
            n_bad++;
            fprintf(stderr, "  malformed golden line: %.60s\n", line);
        }
    }
    s_case_clear(&c);
    free(buf);
    fprintf(stderr, "  %d chat cases, %d refused templates, %d failures\n", n_cases, n_rejects, n_bad);
    CHECK(n_cases >= 20);
    CHECK(n_rejects >= 3);
    CHECK_EQ_INT(n_bad, 0);
}

static void test_render_contract(void) {
    REQUIRE(s_chat);
    char out[256];
    eng_chat_msg_t m[2] = {{"user", "hi"}, {NULL, "x"}};
    CHECK_EQ_INT(eng_chat_render(s_chat, m, 2, false, out, sizeof out), PD_EINVAL); /* NULL role */
    CHECK_EQ_INT(eng_chat_render(s_chat, m, 0, true, out, sizeof out), PD_EINVAL);  /* transformers refuses too */
    CHECK_EQ_INT(eng_chat_render(s_chat, NULL, 1, true, out, sizeof out), PD_EINVAL);
    int64_t n = eng_chat_render(s_chat, m, 1, true, out, sizeof out);
    const char *want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                       "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    CHECK(n == (int64_t)strlen(want) && strcmp(out, want) == 0);

    char err[256] = "";
    eng_chat_t *bad = eng_chat_create(NULL, NULL, err, sizeof err); /* no GGUF and no template */
    CHECK(bad == NULL && err[0]);
    bad = eng_chat_create(s_gguf, "{{ unterminated '<|im_start|><|im_end|>", err, sizeof err);
    CHECK(bad == NULL && err[0]);
    eng_chat_destroy(&bad);
}

int main(void) {
    PD_TEST_RUN(test_load);
    PD_TEST_RUN(test_chat_golden);
    PD_TEST_RUN(test_render_contract);
    eng_chat_destroy(&s_chat);
    eng_gguf_destroy(&s_gguf);
    return pd_test_finish();
}
