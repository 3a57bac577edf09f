/* eng_chat.h: chat templates. Renders a conversation to the prompt text the model was trained on,
 * identical to transformers' apply_chat_template for the templates we recognise (ChatML family,
 * including SmolLM2's default-system-prompt variant). Not a general Jinja engine: an unknown template
 * is refused with a clear error rather than rendered approximately. */
#ifndef ENG_CHAT_H
#define ENG_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_gguf.h"
#include "pd_common.h"

typedef struct eng_chat eng_chat_t;

typedef struct {
    const char *role;    /* "system", "user", "assistant" (others passed through as the template does) */
    const char *content; /* UTF-8, NUL-terminated */
} eng_chat_msg_t;

/* Recognises the template in tokenizer.chat_template (or template_text when not NULL, overriding it;
 * g may then be NULL). Accepted: plain ChatML and ChatML with a default system prompt used when the first
 * message is not a system one (SmolLM2's), in any spelling Jinja reads the same (spacing, quotes,
 * whitespace control, 'a' + 'b'). NULL + reason in err for an unknown or missing template. Copies what
 * it needs. Caller destroys. */
eng_chat_t *eng_chat_create(const eng_gguf_t *g, const char *template_text, char *err, size_t err_cap);
void eng_chat_destroy(eng_chat_t **chat);

/* Renders messages. Writes at most cap bytes plus a NUL when room, returns the length of the full
 * rendering (call again with a larger buffer when >= cap), or PD_EINVAL for a NULL role/content or an
 * empty conversation (transformers refuses that too). Any thread. */
PD_NODISCARD int64_t eng_chat_render(const eng_chat_t *chat, const eng_chat_msg_t *msgs, int n_msgs,
                                     bool add_generation_prompt, char *out, size_t cap);

#endif
