/* eng_chat.c: recognises ChatML chat templates (plain, and SmolLM2's with a default system prompt) and
 * renders conversations with them byte-for-byte as transformers' apply_chat_template does. It is not a
 * Jinja engine: the template is normalised (tags re-spaced token by token, quotes unified, adjacent string
 * literals folded, transformers' trim_blocks/lstrip_blocks and '-' markers applied) and must then equal a
 * known skeleton; anything else is refused, so a template is never rendered approximately. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_chat.h"
#include "pd_log.h"

struct eng_chat {
    char *default_system; /* NULL: the template has no default system prompt */
    const char *name;     /* which skeleton matched, for logs */
};

/* The known templates, written as Jinja and normalised like the input. '\x01' (inside the literal) stands
 * for the default system prompt, which is captured. */
static const struct {
    const char *name;
    const char *jinja;
} s_skeletons[] = {
    {"chatml", "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"},
    {"chatml-default-system",
     "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
     "{{ '<|im_start|>system\\n\x01<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
     "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
     "{{ '<|im_start|>assistant\\n' }}{% endif %}"},
};

/* ---- growable string ---- */

typedef struct {
    char *p;
    size_t n, cap;
} s_buf_t;

static void s_put(s_buf_t *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p = pd_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void s_putc(s_buf_t *b, char c) {
    s_put(b, &c, 1);
}

/* ---- normalisation ---- */

static bool s_is_ws(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool s_is_word(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Parses a Jinja string literal starting at quote t[*i]; appends its value, escaped canonically
 * (\\ \' \n \t \r), to out. Other escapes (\u, \x, octal) are refused. */
static bool s_literal(const char *t, size_t n, size_t *i, s_buf_t *out, char *err, size_t err_cap) {
    char q = t[(*i)++];
    while (*i < n && t[*i] != q) {
        char c = t[(*i)++];
        if (c == '\\') {
            if (*i >= n) break;
            char e = t[(*i)++];
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case '\\':
            case '\'':
            case '"': c = e; break;
            default: snprintf(err, err_cap, "chat template: unsupported string escape '\\%c'", e); return false;
            }
        }
        switch (c) {
        case '\\': s_put(out, "\\\\", 2); break;
        case '\'': s_put(out, "\\'", 2); break;
        case '\n': s_put(out, "\\n", 2); break;
        case '\t': s_put(out, "\\t", 2); break;
        case '\r': s_put(out, "\\r", 2); break;
        default: s_putc(out, c);
        }
    }
    if (*i >= n) {
        snprintf(err, err_cap, "chat template: unterminated string literal");
        return false;
    }
    (*i)++;
    return true;
}

/* Whitespace-control flags of a tag: kind ('{', '%' or '#') and its '-'/'+' markers on either side. */
typedef struct {
    bool is_block; /* statement or comment: trim_blocks and lstrip_blocks apply */
    bool minus_left, plus_left, minus_right, plus_right;
} s_tag_ws_t;

/* Length of the Jinja operator or punctuation token at t[i]: the two-character operators, else one. */
static size_t s_op_len(const char *t, size_t n, size_t i) {
    static const char *const two[] = {"==", "!=", "<=", ">=", "//", "**"};
    for (size_t k = 0; k < sizeof two / sizeof two[0]; k++)
        if (i + 1 < n && t[i] == two[k][0] && t[i + 1] == two[k][1]) return 2;
    return 1;
}

/* Normalises the inside of one tag, from t[*i] up to and including its close marker ("}}" for an expression,
 * "%}" for a statement, either possibly with '-'/'+' before it, recorded in ws). The body is lexed into
 * Jinja tokens (names, numbers, string literals, operators) written one space apart, so spacing never
 * matters but token boundaries do; 'a' + 'b' is folded into 'ab'. */
static bool s_tag_body(const char *t, size_t n, size_t *i, char close, s_tag_ws_t *ws, s_buf_t *out, char *err,
                       size_t err_cap) {
    enum { S_NONE, S_STR, S_STR_PLUS, S_OTHER } prev = S_NONE;
    while (*i < n) {
        char c = t[*i];
        if (s_is_ws(c)) {
            (*i)++;
            continue;
        }
        size_t m = 0; /* length of a close marker here */
        if (c == close && *i + 1 < n && t[*i + 1] == '}')
            m = 2;
        else if ((c == '-' || (c == '+' && close == '%')) && *i + 2 < n && t[*i + 1] == close && t[*i + 2] == '}')
            m = 3;
        if (m) { /* the markers have done their work on the raw text: keep only the plain close */
            if (prev == S_STR_PLUS) s_put(out, " +", 2);
            ws->minus_right = m == 3 && c == '-';
            ws->plus_right = m == 3 && c == '+';
            s_putc(out, close);
            s_putc(out, '}');
            *i += m;
            return true;
        }
        if (c == '\'' || c == '"') {
            if (prev == S_STR_PLUS) {
                out->n--; /* 'a' + 'b' -> 'ab': reopen the previous literal */
            } else {
                if (prev != S_NONE) s_putc(out, ' ');
                s_putc(out, '\'');
            }
            if (!s_literal(t, n, i, out, err, err_cap)) return false;
            s_putc(out, '\'');
            prev = S_STR;
            continue;
        }
        if (c == '+' && prev == S_STR) {
            prev = S_STR_PLUS;
            (*i)++;
            continue;
        }
        if (prev == S_STR_PLUS) s_put(out, " +", 2);
        if (prev != S_NONE) s_putc(out, ' ');
        size_t len = 1;
        if (s_is_word(c))
            while (*i + len < n && s_is_word(t[*i + len])) len++;
        else
            len = s_op_len(t, n, *i);
        s_put(out, t + *i, len);
        *i += len;
        prev = S_OTHER;
    }
    snprintf(err, err_cap, "chat template: unterminated tag");
    return false;
}

/* Appends the raw text t[a..b) between two tags after transformers' Jinja settings (trim_blocks,
 * lstrip_blocks) and the tags' '-'/'+' markers. prev/next are NULL at the template's ends. */
static void s_raw(const char *t, size_t a, size_t b, const s_tag_ws_t *prev, const s_tag_ws_t *next, s_buf_t *out) {
    bool at_template_start = a == 0;
    if (prev && prev->minus_right) {
        while (a < b && s_is_ws(t[a])) a++;
    } else if (prev && prev->is_block && !prev->plus_right && a < b && t[a] == '\n') {
        a++; /* trim_blocks */
    }
    if (next && next->minus_left) {
        while (b > a && s_is_ws(t[b - 1])) b--;
    } else if (next && next->is_block && !next->plus_left) { /* lstrip_blocks: block tag first on its line */
        size_t k = b;
        while (k > a && (t[k - 1] == ' ' || t[k - 1] == '\t')) k--;
        if ((k > a && t[k - 1] == '\n') || (k == a && at_template_start)) b = k;
    }
    s_put(out, t + a, b - a);
}

static size_t s_next_tag(const char *t, size_t n, size_t i) {
    for (; i + 1 < n; i++)
        if (t[i] == '{' && (t[i + 1] == '{' || t[i + 1] == '%' || t[i + 1] == '#')) return i;
    return n;
}

static bool s_normalise(const char *t, size_t n, s_buf_t *out, char *err, size_t err_cap) {
    s_tag_ws_t prev = {0}, next = {0};
    bool has_prev = false;
    size_t i = 0;
    s_put(out, "", 0);
    for (;;) {
        size_t j = s_next_tag(t, n, i);
        if (j < n) {
            char kind = t[j + 1], mark = j + 2 < n ? t[j + 2] : 0;
            next = (s_tag_ws_t){kind != '{', mark == '-', mark == '+' && kind == '%', false, false};
        }
        s_raw(t, i, j, has_prev ? &prev : NULL, j < n ? &next : NULL, out);
        if (j >= n) return true;
        size_t open = (next.minus_left || next.plus_left) ? 3 : 2;
        if (t[j + 1] == '#') { /* comment: dropped, but it trims like a block tag */
            size_t k = j + open;
            while (k + 1 < n && !(t[k] == '#' && t[k + 1] == '}')) k++;
            if (k + 1 >= n) {
                snprintf(err, err_cap, "chat template: unterminated comment");
                return false;
            }
            next.minus_right = t[k - 1] == '-';
            i = k + 2;
        } else {
            s_put(out, t + j, 2);
            i = j + open;
            if (!s_tag_body(t, n, &i, t[j + 1] == '{' ? '}' : '%', &next, out, err, err_cap)) return false;
        }
        prev = next;
        has_prev = true;
    }
}

static bool s_contains(const char *t, size_t n, const char *needle) {
    size_t m = strlen(needle);
    for (size_t i = 0; i + m <= n; i++)
        if (memcmp(t + i, needle, m) == 0) return true;
    return false;
}

/* Undoes the canonical escapes of a captured literal; NULL when it holds an unescaped quote. */
static char *s_unescape(const char *s, size_t n) {
    s_buf_t b = {0};
    s_put(&b, "", 0);
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\'') {
            free(b.p);
            return NULL;
        }
        if (c == '\\' && i + 1 < n) {
            char e = s[++i];
            c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        }
        s_putc(&b, c);
    }
    return b.p;
}

/* ---- public ---- */

eng_chat_t *eng_chat_create(const eng_gguf_t *g, const char *template_text, char *err, size_t err_cap) {
    char dummy[8];
    if (!err || err_cap == 0) {
        err = dummy;
        err_cap = sizeof dummy;
    }
    err[0] = '\0';
    const char *t = template_text;
    size_t n = t ? strlen(t) : 0;
    eng_gguf_str_t s;
    if (!t) {
        if (!g || !eng_gguf_get_str(g, "tokenizer.chat_template", &s)) {
            snprintf(err, err_cap, "no chat template: tokenizer.chat_template is missing");
            return NULL;
        }
        t = s.ptr;
        n = s.len;
    }
    if (!s_contains(t, n, "<|im_start|>") || !s_contains(t, n, "<|im_end|>")) {
        snprintf(err, err_cap, "chat template not recognised: only ChatML (<|im_start|>/<|im_end|>) is supported");
        return NULL;
    }
    s_buf_t norm = {0}, skel = {0};
    eng_chat_t *chat = NULL;
    if (!s_normalise(t, n, &norm, err, err_cap)) goto fail;
    for (size_t k = 0; k < sizeof s_skeletons / sizeof s_skeletons[0] && !chat; k++) {
        skel.n = 0;
        if (!s_normalise(s_skeletons[k].jinja, strlen(s_skeletons[k].jinja), &skel, err, err_cap)) goto fail;
        const char *mark = memchr(skel.p, '\x01', skel.n);
        size_t head = mark ? (size_t)(mark - skel.p) : skel.n, tail = mark ? skel.n - head - 1 : 0;
        if (norm.n < head + tail || memcmp(norm.p, skel.p, head) != 0 ||
            memcmp(norm.p + norm.n - tail, skel.p + head + (mark ? 1 : 0), tail) != 0 || (!mark && norm.n != head))
            continue;
        char *sys = NULL;
        if (mark && !(sys = s_unescape(norm.p + head, norm.n - head - tail))) continue;
        chat = pd_xcalloc(1, sizeof *chat);
        chat->default_system = sys;
        chat->name = s_skeletons[k].name;
    }
    if (!chat)
        snprintf(err, err_cap,
                 "chat template not recognised: it uses ChatML markers but has logic beyond plain "
                 "ChatML (tools, content filters, ...); refusing rather than rendering approximately");
    else
        LOG_D("chat template: %s", chat->name);
fail:
    free(norm.p);
    free(skel.p);
    return chat;
}

void eng_chat_destroy(eng_chat_t **pchat) {
    if (!pchat || !*pchat) return;
    free((*pchat)->default_system);
    free(*pchat);
    *pchat = NULL;
}

typedef struct {
    char *out;
    size_t cap, n;
} s_sink_t;

static void s_emit(s_sink_t *s, const char *p) {
    size_t len = strlen(p);
    if (s->n < s->cap) memcpy(s->out + s->n, p, len <= s->cap - s->n ? len : s->cap - s->n);
    s->n += len;
}

int64_t eng_chat_render(const eng_chat_t *chat, const eng_chat_msg_t *msgs, int n_msgs, bool add_generation_prompt,
                        char *out, size_t cap) {
    /* an empty conversation is an error, as in transformers ("Cannot apply chat template to an empty
     * conversation") */
    if (!chat || n_msgs <= 0 || !msgs || (cap > 0 && !out)) return PD_EINVAL;
    for (int i = 0; i < n_msgs; i++)
        if (!msgs[i].role || !msgs[i].content) return PD_EINVAL;
    s_sink_t s = {out, cap, 0};
    for (int i = 0; i < n_msgs; i++) {
        if (i == 0 && chat->default_system && strcmp(msgs[0].role, "system") != 0) {
            s_emit(&s, "<|im_start|>system\n");
            s_emit(&s, chat->default_system);
            s_emit(&s, "<|im_end|>\n");
        }
        s_emit(&s, "<|im_start|>");
        s_emit(&s, msgs[i].role);
        s_emit(&s, "\n");
        s_emit(&s, msgs[i].content);
        s_emit(&s, "<|im_end|>\n");
    }
    if (add_generation_prompt) s_emit(&s, "<|im_start|>assistant\n");
    if (s.n < cap) out[s.n] = '\0';
    return (int64_t)s.n;
}
