/* dc_draft.h: the draft model of speculative decoding (dc_spec.h), run by the executor on the engine thread
 * just before the verification forward. A second, smaller GGUF model with the target's tokenizer (checked at
 * creation) keeps its own paged KV (blocks and positions are dc_sched's bookkeeping, in the plan). Per step, for
 * the plan's decode rows with draft work: one batched draft forward that feeds each row's unseen history (its
 * catch-up: a whole prompt the first time, then the tokens accepted last step) and proposes the first draft,
 * then one batched forward per further depth, one token per row still drafting. Drafts are greedy (the argmax
 * of the draft's logits): a point-mass proposal, which verification accepts with exactly the target's
 * probability. */
#ifndef DC_DRAFT_H
#define DC_DRAFT_H

#include <stddef.h>
#include <stdint.h>

#include "dc_sched.h"
#include "eng.h"
#include "pd_common.h"

typedef struct dc_draft dc_draft_t;

/* draft and target are borrowed and outlive d. Refused (NULL, one line in err) when the draft's tokenizer is not
 * the target's (vocabulary size and eng_tok_hash: drafts are token ids, so both must mean the same thing by
 * them) or when its batch limits are below max_rows rows / max_tokens tokens. */
dc_draft_t *dc_draft_create(eng_t *draft, const eng_t *target, int32_t max_rows, int32_t max_tokens, char *err,
                            size_t err_cap);
void dc_draft_destroy(dc_draft_t **d);

/* Runs the plan's draft work (dc_plan_t: draft_n_in, draft_k, draft_pos, draft tables), adds the proposals to
 * the plan (dc_plan_set_drafts) and sets draft_cached_out for every row it fed. A draft forward that fails
 * leaves the step undrafted from that depth on (logged; the verification forward still runs). Returns the
 * drafts added. Thread: the engine thread, while the plan is in flight. */
int32_t dc_draft_run(dc_draft_t *d, dc_plan_t *plan);

#endif
