/* test_rt_openai.c: the OpenAI request mapping (every field, every refusal with its param) and the response
 * bodies and SSE framing. With RT_OPENAI_DUMP_DIR set, also writes every kind of response body there, one
 * JSON per file, for tests/golden/openai/check_openai_shapes.py to check against the openai package. */
#include "pd_test.h"
#include "rt_openai.h"

#include <jansson.h>
#include <math.h>

static const char *const s_models[] = {"smollm", "other-model"};

static rt_openai_limits_t s_lim(void) {
    rt_openai_limits_t lim = rt_openai_limits_default();
    lim.models = s_models;
    lim.n_models = 2;
    lim.api.max_tokens = 4096;
    lim.max_body_bytes = 1 << 16;
    return lim;
}

static pd_status s_parse(rt_openai_endpoint_t ep, const char *body, Pdserve__V1__GenerateRequest **req,
                         rt_openai_ctx_t *ctx, rt_openai_error_t *err) {
    rt_openai_limits_t lim = s_lim();
    return ep == RT_OPENAI_CHAT ? rt_openai_parse_chat(body, strlen(body), &lim, req, ctx, err)
                                : rt_openai_parse_completion(body, strlen(body), &lim, req, ctx, err);
}

/* Expects a refusal with this HTTP status and param ("" = null). */
static void s_expect_bad(rt_openai_endpoint_t ep, const char *body, int http, const char *param) {
    Pdserve__V1__GenerateRequest *req = (void *)1;
    rt_openai_error_t err;
    pd_status st = s_parse(ep, body, &req, NULL, &err);
    CHECK_MSG(st == PD_EINVAL, "body %.120s: status %d", body, st);
    CHECK_MSG(req == NULL, "body %.120s: out not cleared", body);
    if (st == PD_OK) rt_openai_request_free(&req);
    CHECK_MSG(err.http_status == http, "body %.120s: http %d, want %d (%s)", body, err.http_status, http, err.message);
    CHECK_MSG(!strcmp(err.param, param), "body %.120s: param '%s', want '%s' (%s)", body, err.param, param,
              err.message);
    CHECK_MSG(err.message[0], "body %.120s: empty message", body);
}

static Pdserve__V1__GenerateRequest *s_parse_ok(rt_openai_endpoint_t ep, const char *body, rt_openai_ctx_t *ctx) {
    Pdserve__V1__GenerateRequest *req = NULL;
    rt_openai_error_t err = {0};
    rt_openai_ctx_t local;
    pd_status st = s_parse(ep, body, &req, ctx ? ctx : &local, &err);
    CHECK_MSG(st == PD_OK && req, "body %.160s: %d %s (param %s)", body, st, err.message, err.param);
    return req;
}

/* ---- requests ---- */

static void test_completion_all_fields(void) {
    rt_openai_ctx_t ctx;
    Pdserve__V1__GenerateRequest *r = s_parse_ok(
        RT_OPENAI_COMPLETIONS,
        "{\"model\":\"other-model\",\"prompt\":\"Once upon\",\"max_tokens\":32,\"temperature\":0.5,"
        "\"top_p\":0.9,\"n\":1,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"stop\":[\"\\n\",\"END\"],\"seed\":-1,\"logprobs\":3,\"presence_penalty\":0.25,"
        "\"frequency_penalty\":-0.5,\"user\":\"u1\",\"top_k\":40,\"min_p\":0.05,\"repetition_penalty\":1.1,"
        "\"ignore_eos\":true,\"best_of\":1,\"echo\":false,\"logit_bias\":{},\"suffix\":null,\"metadata\":{\"a\":1},"
        "\"some_future_field\":[1,{\"x\":2}]}",
        &ctx);
    REQUIRE(r);
    CHECK(!strcmp(r->model, "other-model"));
    CHECK_EQ_INT(r->prompt_case, PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT);
    CHECK(!strcmp(r->text, "Once upon"));
    CHECK_EQ_INT(r->max_tokens, 32);
    REQUIRE(r->sampling);
    CHECK(r->sampling->temperature == 0.5f);
    CHECK(r->sampling->top_p == 0.9f);
    CHECK(r->sampling->presence_penalty == 0.25f);
    CHECK(r->sampling->frequency_penalty == -0.5f);
    CHECK_EQ_INT(r->sampling->top_k, 40);
    CHECK(r->sampling->min_p == 0.05f);
    CHECK(r->sampling->repetition_penalty == 1.1f);
    CHECK(r->sampling->has_seed);
    CHECK(r->sampling->seed == UINT64_MAX);
    CHECK_EQ_INT(r->sampling->logprobs, 3);
    CHECK(r->stream);
    CHECK(r->ignore_eos);
    CHECK_EQ_INT(r->n_stop, 2);
    CHECK(!strcmp(r->stop[0], "\n") && !strcmp(r->stop[1], "END"));
    CHECK_EQ_INT(r->request_id, 0);
    CHECK_EQ_INT(r->timeout_ms, 0);
    CHECK_EQ_INT(ctx.endpoint, RT_OPENAI_COMPLETIONS);
    CHECK(!strcmp(ctx.model, "other-model"));
    CHECK(ctx.is_stream && ctx.include_usage && ctx.has_logprobs);
    CHECK_EQ_INT(ctx.n_top_logprobs, 3);
    rt_openai_request_free(&r);
    CHECK(r == NULL);
    rt_openai_request_free(&r); /* NULL is fine */
    rt_openai_request_free(NULL);
}

static void test_completion_defaults(void) {
    rt_openai_ctx_t ctx;
    Pdserve__V1__GenerateRequest *r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\"}", &ctx);
    REQUIRE(r);
    CHECK(!strcmp(r->model, "smollm")); /* the default: models[0] */
    CHECK(r->sampling->temperature == 1.f);
    CHECK(r->sampling->top_p == 1.f && r->sampling->repetition_penalty == 1.f);
    CHECK(r->sampling->top_k == 0 && r->sampling->min_p == 0.f && !r->sampling->has_seed);
    CHECK_EQ_INT(r->max_tokens, 16);
    CHECK(!r->stream && !r->ignore_eos && r->n_stop == 0);
    CHECK(!ctx.is_stream && !ctx.include_usage && !ctx.has_logprobs);
    rt_openai_request_free(&r);
    /* nulls read as absent; top_k -1 is off; a single stop string; logprobs 0 asks for the token's own */
    r = s_parse_ok(RT_OPENAI_COMPLETIONS,
                   "{\"model\":\"\",\"prompt\":\"hi\",\"max_tokens\":null,\"temperature\":null,\"stop\":\"x\","
                   "\"top_k\":-1,\"n\":null,\"seed\":0,\"logprobs\":0,\"stream\":false,\"stream_options\":null,"
                   "\"tools\":[],\"tool_choice\":\"none\",\"response_format\":{\"type\":\"text\"}}",
                   &ctx);
    REQUIRE(r);
    CHECK(!strcmp(r->model, "smollm"));
    CHECK_EQ_INT(r->max_tokens, 16);
    CHECK(r->sampling->temperature == 1.f);
    CHECK_EQ_INT(r->n_stop, 1);
    CHECK(!strcmp(r->stop[0], "x"));
    CHECK_EQ_INT(r->sampling->top_k, 0);
    CHECK(r->sampling->has_seed && r->sampling->seed == 0);
    CHECK(ctx.has_logprobs && ctx.n_top_logprobs == 0);
    rt_openai_request_free(&r);
    /* temperature 0 is greedy, an integer is a number */
    r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\",\"temperature\":0,\"top_p\":1}", NULL);
    REQUIRE(r);
    CHECK(r->sampling->temperature == 0.f);
    rt_openai_request_free(&r);
    /* without a model list any id goes, and empty stays empty (= the worker's default) */
    rt_openai_limits_t lim = rt_openai_limits_default();
    rt_openai_error_t err;
    const char *b = "{\"model\":\"whatever\",\"prompt\":\"hi\"}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &r, NULL, &err), PD_OK);
    REQUIRE(r);
    CHECK(!strcmp(r->model, "whatever"));
    rt_openai_request_free(&r);
    b = "{\"prompt\":\"hi\"}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &r, NULL, &err), PD_OK);
    REQUIRE(r);
    CHECK(!strcmp(r->model, ""));
    rt_openai_request_free(&r);
}

static void test_completion_prompt_forms(void) {
    Pdserve__V1__GenerateRequest *r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":[\"only one\"]}", NULL);
    REQUIRE(r);
    CHECK(r->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT && !strcmp(r->text, "only one"));
    rt_openai_request_free(&r);
    r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":[1,2,2147483647]}", NULL);
    REQUIRE(r);
    REQUIRE(r->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS);
    CHECK_EQ_INT(r->token_ids->n_ids, 3);
    CHECK(r->token_ids->ids[0] == 1 && r->token_ids->ids[2] == INT32_MAX);
    rt_openai_request_free(&r);
    r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":[[7,8]]}", NULL);
    REQUIRE(r);
    REQUIRE(r->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS);
    CHECK(r->token_ids->n_ids == 2 && r->token_ids->ids[1] == 8);
    rt_openai_request_free(&r);
    /* unicode survives */
    r = s_parse_ok(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00\"}", NULL);
    REQUIRE(r);
    CHECK(!strcmp(r->text, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
    rt_openai_request_free(&r);

    const rt_openai_endpoint_t C = RT_OPENAI_COMPLETIONS;
    s_expect_bad(C, "{}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":null}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":5}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":\"\"}", 400, "prompt"); /* the validator: text is empty */
    s_expect_bad(C, "{\"prompt\":[]}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":[\"a\",\"b\"]}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":[[1],[2]]}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":[[]]}", 400, "prompt");
    s_expect_bad(C, "{\"prompt\":[1,\"a\"]}", 400, "prompt[1]");
    s_expect_bad(C, "{\"prompt\":[1,2.5]}", 400, "prompt[1]");
    s_expect_bad(C, "{\"prompt\":[-1]}", 400, "prompt[0]");
    s_expect_bad(C, "{\"prompt\":[2147483648]}", 400, "prompt[0]");
    s_expect_bad(C, "{\"prompt\":[{}]}", 400, "prompt");
    /* token ids beyond the vocabulary: the validator's check, reported on prompt */
    rt_openai_limits_t lim = s_lim();
    lim.api.vocab_size = 100;
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *req;
    const char *b = "{\"prompt\":[1,100]}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &req, NULL, &err), PD_EINVAL);
    CHECK(!strcmp(err.param, "prompt[1]"));
    CHECK_MSG(strstr(err.message, "prompt[1] = 100, must be in [0, 100)"), "%s", err.message);
    /* a prompt over max_prompt_bytes */
    lim.api.max_prompt_bytes = 4;
    b = "{\"prompt\":\"12345\"}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &req, NULL, &err), PD_EINVAL);
    CHECK(!strcmp(err.param, "prompt"));
}

static void test_chat_fields(void) {
    rt_openai_ctx_t ctx;
    Pdserve__V1__GenerateRequest *r =
        s_parse_ok(RT_OPENAI_CHAT,
                   "{\"model\":\"smollm\",\"messages\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
                   "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hello\"},{\"type\":\"text\",\"text\":"
                   "\"there\"}],\"name\":\"bob\"},{\"role\":\"assistant\",\"content\":\"Hi\",\"tool_calls\":[]},"
                   "{\"role\":\"system\",\"content\":\"s\"}],\"max_completion_tokens\":7,\"max_tokens\":99,"
                   "\"logprobs\":true,\"top_logprobs\":5,\"stream\":true,\"temperature\":0.0,\"seed\":42,"
                   "\"parallel_tool_calls\":true,\"store\":false,\"service_tier\":\"auto\",\"modalities\":[\"text\"]}",
                   &ctx);
    REQUIRE(r);
    REQUIRE(r->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT);
    REQUIRE(r->chat->n_messages == 4);
    CHECK(!strcmp(r->chat->messages[0]->role, "system") && !strcmp(r->chat->messages[0]->content, "Be brief."));
    CHECK(!strcmp(r->chat->messages[1]->role, "user") && !strcmp(r->chat->messages[1]->content, "Hello\nthere"));
    CHECK(!strcmp(r->chat->messages[2]->role, "assistant") && !strcmp(r->chat->messages[2]->content, "Hi"));
    CHECK(!strcmp(r->chat->messages[3]->role, "system"));
    CHECK_EQ_INT(r->max_tokens, 7); /* max_completion_tokens wins */
    CHECK_EQ_INT(r->sampling->logprobs, 5);
    CHECK(r->sampling->temperature == 0.f && r->sampling->has_seed && r->sampling->seed == 42);
    CHECK(r->stream);
    CHECK(ctx.endpoint == RT_OPENAI_CHAT && ctx.has_logprobs && ctx.n_top_logprobs == 5 && ctx.is_stream);
    CHECK(!ctx.include_usage);
    rt_openai_request_free(&r);

    r = s_parse_ok(RT_OPENAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":9}", &ctx);
    REQUIRE(r);
    CHECK_EQ_INT(r->max_tokens, 9);
    CHECK(!ctx.has_logprobs && ctx.n_top_logprobs == 0);
    rt_openai_request_free(&r);
    r = s_parse_ok(RT_OPENAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true}", &ctx);
    REQUIRE(r);
    CHECK_EQ_INT(r->max_tokens, 0); /* chat default: up to the context length */
    CHECK(ctx.has_logprobs && ctx.n_top_logprobs == 0);
    rt_openai_request_free(&r);
}

static void test_chat_refusals(void) {
    const rt_openai_endpoint_t H = RT_OPENAI_CHAT;
    s_expect_bad(H, "{}", 400, "messages");
    s_expect_bad(H, "{\"messages\":[]}", 400, "messages");
    s_expect_bad(H, "{\"messages\":{}}", 400, "messages");
    s_expect_bad(H, "{\"messages\":[\"hi\"]}", 400, "messages[0]");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}", 400, "messages[0].role");
    s_expect_bad(H, "{\"messages\":[{\"content\":\"x\"}]}", 400, "messages[0].role");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"tool\",\"content\":\"x\"}]}", 400,
                 "messages[1].role");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0].content");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":null}]}", 400, "messages[0].content");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"\"}]}", 400, "messages[0].content");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":7}]}", 400, "messages[0].content");
    s_expect_bad(H,
                 "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                 "{\"type\":\"image_url\",\"image_url\":{\"url\":\"http://x/y.png\"}}]}]}",
                 400, "messages[0].content[1].type");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}]}", 400,
                 "messages[0].content[0].type");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":3}]}]}", 400,
                 "messages[0].content[0].text");
    s_expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":[]}]}", 400, "messages[0].content");
    s_expect_bad(H,
                 "{\"messages\":[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":[{\"id\":\"1\","
                 "\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}]}",
                 400, "messages[0].tool_calls");
    const char *msg = "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]";
    char b[512];
#define BAD(extra, param)                             \
    do {                                              \
        snprintf(b, sizeof b, "{%s,%s}", msg, extra); \
        s_expect_bad(H, b, 400, param);               \
    } while (0)
    BAD("\"logprobs\":1", "logprobs");
    BAD("\"top_logprobs\":2", "top_logprobs"); /* needs logprobs: true */
    BAD("\"logprobs\":true,\"top_logprobs\":21", "top_logprobs");
    BAD("\"logprobs\":true,\"top_logprobs\":-1", "top_logprobs");
    BAD("\"logprobs\":true,\"top_logprobs\":\"3\"", "top_logprobs");
    BAD("\"max_completion_tokens\":0", "max_completion_tokens");
    BAD("\"max_completion_tokens\":5000", "max_completion_tokens"); /* lim.api.max_tokens = 4096 */
    BAD("\"max_tokens\":5000", "max_tokens");
    BAD("\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]", "tools");
    BAD("\"tool_choice\":\"required\"", "tool_choice");
    BAD("\"functions\":[{\"name\":\"f\"}]", "functions");
    BAD("\"function_call\":{\"name\":\"f\"}", "function_call");
    BAD("\"response_format\":{\"type\":\"json_object\"}", "response_format");
    BAD("\"modalities\":[\"text\",\"audio\"]", "modalities");
    BAD("\"audio\":{\"voice\":\"x\"}", "audio");
    BAD("\"n\":2", "n");
    BAD("\"continue_final_message\":true", "continue_final_message");
    BAD("\"add_generation_prompt\":false", "add_generation_prompt");
    BAD("\"chat_template\":\"{{x}}\"", "chat_template");
#undef BAD
    /* the 404 */
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *r;
    snprintf(b, sizeof b, "{%s,\"model\":\"gpt-4\"}", msg);
    CHECK_EQ_INT(s_parse(H, b, &r, NULL, &err), PD_EINVAL);
    CHECK_EQ_INT(err.http_status, 404);
    CHECK_EQ_INT(err.code, PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND);
}

static void test_type_and_range_errors(void) {
    static const struct {
        const char *extra, *param;
    } cases[] = {
        {"\"temperature\":\"hot\"", "temperature"},
        {"\"temperature\":true", "temperature"},
        {"\"temperature\":101", "temperature"},
        {"\"temperature\":-0.5", "temperature"},
        {"\"temperature\":1e300", "temperature"}, /* inf as a float */
        {"\"top_p\":\"x\"", "top_p"},
        {"\"top_p\":0", "top_p"}, /* 0 would mean "unset" on the wire */
        {"\"top_p\":1.5", "top_p"},
        {"\"top_p\":-0.1", "top_p"},
        {"\"min_p\":2", "min_p"},
        {"\"min_p\":[]", "min_p"},
        {"\"repetition_penalty\":0", "repetition_penalty"},
        {"\"repetition_penalty\":11", "repetition_penalty"},
        {"\"presence_penalty\":3", "presence_penalty"},
        {"\"frequency_penalty\":-2.5", "frequency_penalty"},
        {"\"frequency_penalty\":\"1\"", "frequency_penalty"},
        {"\"top_k\":\"a\"", "top_k"},
        {"\"top_k\":-2", "top_k"},
        {"\"top_k\":1.5", "top_k"},
        {"\"top_k\":3000000000", "top_k"},
        {"\"stream\":\"yes\"", "stream"},
        {"\"stream\":1", "stream"},
        {"\"stream_options\":1", "stream_options"},
        {"\"stream_options\":{\"include_usage\":\"x\"}", "stream_options.include_usage"},
        {"\"max_tokens\":1.5", "max_tokens"},
        {"\"max_tokens\":16.0", "max_tokens"},
        {"\"max_tokens\":0", "max_tokens"},
        {"\"max_tokens\":-1", "max_tokens"},
        {"\"max_tokens\":4294967296", "max_tokens"},
        {"\"max_tokens\":\"16\"", "max_tokens"},
        {"\"max_tokens\":4097", "max_tokens"},
        {"\"seed\":1.5", "seed"},
        {"\"seed\":\"1\"", "seed"},
        {"\"stop\":5", "stop"},
        {"\"stop\":[1]", "stop"},
        {"\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]", "stop"},
        {"\"stop\":\"\"", "stop[0]"},
        {"\"stop\":[\"a\",\"\"]", "stop[1]"},
        {"\"logprobs\":6", "logprobs"},
        {"\"logprobs\":-1", "logprobs"},
        {"\"logprobs\":true", "logprobs"},
        {"\"ignore_eos\":\"no\"", "ignore_eos"},
        {"\"model\":5", "model"},
        {"\"model\":\"nope\"", "model"},
        {"\"n\":2", "n"},
        {"\"n\":0", "n"},
        {"\"n\":\"1\"", "n"},
        {"\"best_of\":2", "best_of"},
        {"\"echo\":true", "echo"},
        {"\"logit_bias\":{\"50256\":-100}", "logit_bias"},
        {"\"suffix\":\"end\"", "suffix"},
        {"\"tools\":[{}]", "tools"},
        {"\"response_format\":{\"type\":\"json_schema\"}", "response_format"},
        {"\"prompt_logprobs\":1", "prompt_logprobs"},
        {"\"min_tokens\":3", "min_tokens"},
        {"\"stop_token_ids\":[2]", "stop_token_ids"},
        {"\"include_stop_str_in_output\":true", "include_stop_str_in_output"},
        {"\"guided_json\":{}", "guided_json"},
        {"\"skip_special_tokens\":false", "skip_special_tokens"},
        {"\"use_beam_search\":true", "use_beam_search"},
    };
    char b[512];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(b, sizeof b, "{\"prompt\":\"hi\",%s}", cases[i].extra);
        s_expect_bad(RT_OPENAI_COMPLETIONS, b, !strcmp(cases[i].extra, "\"model\":\"nope\"") ? 404 : 400,
                     cases[i].param);
    }
    /* the validator's reason comes back with the OpenAI field name */
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *r;
    CHECK_EQ_INT(s_parse(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\",\"temperature\":101}", &r, NULL, &err), PD_EINVAL);
    CHECK_MSG(!strcmp(err.message, "temperature = 101, must be in [0, 100]"), "%s", err.message);
    CHECK_EQ_INT(s_parse(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\",\"top_p\":1.5}", &r, NULL, &err), PD_EINVAL);
    CHECK_MSG(!strcmp(err.message, "top_p = 1.5, must be in (0, 1]"), "%s", err.message);
    CHECK_EQ_INT(err.code, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT);
}

static void test_json_level_errors(void) {
    const rt_openai_endpoint_t C = RT_OPENAI_COMPLETIONS;
    s_expect_bad(C, "{\"prompt\":\"hi\",\"temperature\":1e999}", 400, ""); /* real overflow: NaN/inf never parse */
    s_expect_bad(C, "{\"prompt\":\"hi\",\"seed\":99999999999999999999}", 400, "");
    s_expect_bad(C, "{\"prompt\":\"hi\",\"prompt\":\"again\"}", 400, ""); /* duplicate key */
    s_expect_bad(C, "{\"prompt\":\"hi\",\"stream_options\":{\"include_usage\":true,\"include_usage\":false}}", 400, "");
    s_expect_bad(C, "{\"prompt\":\"hi\"", 400, ""); /* truncated */
    s_expect_bad(C, "{\"prompt\":\"hi", 400, "");
    s_expect_bad(C, "", 400, "");
    s_expect_bad(C, "[1,2]", 400, "");
    s_expect_bad(C, "\"prompt\"", 400, "");
    s_expect_bad(C, "{\"prompt\":\"hi\"} trailing", 400, "");
    s_expect_bad(C, "{\"prompt\":\"a\xff\"}", 400, "");         /* invalid UTF-8 */
    s_expect_bad(C, "{\"prompt\":\"a\xed\xa0\x80\"}", 400, ""); /* a surrogate in UTF-8 */
    s_expect_bad(C, "{\"prompt\":\"a\\ud800\"}", 400, "");      /* a lone surrogate escape */
    s_expect_bad(C, "{\"prompt\":\"a\\u0000b\"}", 400, "");     /* NUL would cut the C string */
    s_expect_bad(C, "{\"prompt\":NaN}", 400, "");
    /* deep nesting inside an ignored field still fails at the parser (depth 2048), without recursion trouble */
    size_t depth = 100000;
    char *deep = malloc(2 * depth + 64);
    REQUIRE(deep);
    size_t n = (size_t)sprintf(deep, "{\"prompt\":\"hi\",\"x\":");
    memset(deep + n, '[', depth);
    memset(deep + n + depth, ']', depth);
    strcpy(deep + n + 2 * depth, "}");
    rt_openai_limits_t lim = s_lim();
    lim.max_body_bytes = 1 << 20;
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *r;
    CHECK_EQ_INT(rt_openai_parse_completion(deep, strlen(deep), &lim, &r, NULL, &err), PD_EINVAL);
    CHECK_EQ_INT(err.http_status, 400);
    CHECK_MSG(strstr(err.message, "depth"), "%s", err.message);
    free(deep);
    /* over the body cap: refused before parsing, even though it is valid JSON */
    lim.max_body_bytes = 32;
    const char *b = "{\"prompt\":\"this body is longer than 32 bytes\"}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &r, NULL, &err), PD_EINVAL);
    CHECK_EQ_INT(err.http_status, 400);
    CHECK(strstr(err.message, "at most 32"));
    /* the length is honoured: a body that is valid only past len fails */
    lim = s_lim();
    b = "{\"prompt\":\"hi\"}";
    CHECK_EQ_INT(rt_openai_parse_completion(b, 5, &lim, &r, NULL, &err), PD_EINVAL);
    CHECK_EQ_INT(rt_openai_parse_completion(b, strlen(b), &lim, &r, NULL, &err), PD_OK);
    rt_openai_request_free(&r);
    /* NULL arguments */
    CHECK_EQ_INT(rt_openai_parse_completion(NULL, 0, &lim, &r, NULL, &err), PD_EINVAL);
    CHECK_EQ_INT(rt_openai_parse_chat(b, strlen(b), NULL, &r, NULL, NULL), PD_EINVAL);
}

/* ---- responses ---- */

static json_t *s_load(const char *s) {
    json_error_t e;
    json_t *j = json_loads(s, JSON_REJECT_DUPLICATES, &e);
    CHECK_MSG(j, "not JSON (%s): %s", e.text, s);
    return j;
}

static const char *s_str(json_t *j, const char *path) {
    json_t *v = json_object_get(j, path);
    return json_is_string(v) ? json_string_value(v) : "(not a string)";
}

static void test_error_body(void) {
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *r;
    CHECK_EQ_INT(s_parse(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\",\"n\":2}", &r, NULL, &err), PD_EINVAL);
    size_t len;
    char *body = rt_openai_error_body(&err, &len);
    REQUIRE(body);
    CHECK_EQ_INT(len, strlen(body));
    json_t *j = s_load(body), *e = json_object_get(j, "error");
    CHECK(json_object_size(j) == 1 && json_object_size(e) == 4);
    CHECK(!strcmp(s_str(e, "type"), "invalid_request_error"));
    CHECK(!strcmp(s_str(e, "param"), "n"));
    CHECK(json_is_null(json_object_get(e, "code")));
    CHECK(strstr(s_str(e, "message"), "n = 1"));
    json_decref(j);
    free(body);
    /* 404: code model_not_found; null param when unknown */
    CHECK_EQ_INT(s_parse(RT_OPENAI_COMPLETIONS, "{\"prompt\":\"hi\",\"model\":\"x\"}", &r, NULL, &err), PD_EINVAL);
    body = rt_openai_error_body(&err, NULL);
    j = s_load(body);
    e = json_object_get(j, "error");
    CHECK(!strcmp(s_str(e, "code"), "model_not_found") && !strcmp(s_str(e, "param"), "model"));
    json_decref(j);
    free(body);
    rt_openai_error_set(&err, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "queue full");
    CHECK_EQ_INT(err.http_status, 429);
    body = rt_openai_error_body(&err, NULL);
    CHECK_MSG(!strcmp(body, "{\"error\":{\"message\":\"queue full\",\"type\":\"rate_limit_error\",\"param\":null,"
                            "\"code\":\"resource_exhausted\"}}"),
              "%s", body);
    free(body);
    body = rt_openai_error_sse(&err, &len);
    CHECK(!strncmp(body, "data: {\"error\":", 15) && len > 2 && !strcmp(body + len - 2, "\n\n"));
    free(body);
    /* a message with broken UTF-8 (e.g. cut by a worker) still makes valid JSON */
    rt_openai_error_set(&err, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "bad \xe2\x82");
    body = rt_openai_error_body(&err, NULL);
    j = s_load(body);
    CHECK(!strcmp(s_str(json_object_get(j, "error"), "message"), "bad \xef\xbf\xbd\xef\xbf\xbd"));
    CHECK_EQ_INT(err.http_status, 500);
    json_decref(j);
    free(body);
}

/* Chunks of a fake stream: " Hello" (ids 10, 11), " world" (12), then last "!" (13) with usage. */
typedef struct {
    Pdserve__V1__ResponseChunk c[3];
    const Pdserve__V1__ResponseChunk *p[3];
    int32_t ids[4];
    Pdserve__V1__TokenLogprob lp[4];
    Pdserve__V1__TokenLogprob *lpp[4];
    Pdserve__V1__TopLogprob top[4][2];
    Pdserve__V1__TopLogprob *topp[4][2];
    Pdserve__V1__Usage usage;
} s_fake_t;

static void s_fake_init(s_fake_t *f, Pdserve__V1__FinishReason finish) {
    static const char *const piece[4] = {" Hel", "lo", " world", "!"};
    static const char *const alt[4] = {" Hi", "p", " there", "?"};
    memset(f, 0, sizeof *f);
    for (int i = 0; i < 4; i++) {
        f->ids[i] = 10 + i;
        pdserve__v1__token_logprob__init(&f->lp[i]);
        f->lp[i].token = 10 + i;
        f->lp[i].logprob = -0.25f * (float)(i + 1);
        for (int k = 0; k < 2; k++) {
            Pdserve__V1__TopLogprob *t = &f->top[i][k];
            pdserve__v1__top_logprob__init(t);
            /* token 0 (" Hel") is the most likely; the others' sampled token is not among the top 2 */
            bool self = (i == 0 && k == 0);
            const char *s = self ? piece[i] : alt[i];
            t->token = self ? 10 + i : 100 + 2 * i + k;
            t->logprob = self ? f->lp[i].logprob : (k ? -INFINITY : -0.1f);
            t->text.data = (uint8_t *)s;
            t->text.len = strlen(s) - (size_t)k; /* the second alternative: a shorter string */
            f->topp[i][k] = t;
        }
        f->lp[i].top = f->topp[i];
        f->lp[i].n_top = 2;
        f->lpp[i] = &f->lp[i];
    }
    static const char *const text[3] = {" Hello", " world", "!"};
    static const size_t first[3] = {0, 2, 3}, count[3] = {2, 1, 1};
    for (int j = 0; j < 3; j++) {
        pdserve__v1__response_chunk__init(&f->c[j]);
        f->c[j].request_id = 0xabc;
        f->c[j].text = (char *)text[j];
        f->c[j].token_ids = &f->ids[first[j]];
        f->c[j].n_token_ids = count[j];
        f->c[j].logprobs = &f->lpp[first[j]];
        f->c[j].n_logprobs = count[j];
        f->p[j] = &f->c[j];
    }
    pdserve__v1__usage__init(&f->usage);
    f->usage.prompt_tokens = 5;
    f->usage.completion_tokens = 4;
    f->c[2].finish_reason = finish;
    f->c[2].usage = &f->usage;
}

static const char *s_piece(void *ud, int32_t token, size_t *len) {
    static const char *const piece[4] = {" Hel", "lo", " world", "!"};
    (void)ud;
    if (token < 10 || token > 13) return NULL;
    *len = strlen(piece[token - 10]);
    return piece[token - 10];
}

static rt_openai_ctx_t s_ctx(rt_openai_endpoint_t ep, bool logprobs) {
    rt_openai_ctx_t ctx = {.endpoint = ep, .request_id = 0xabc, .created = 1700000000};
    strcpy(ctx.model, "smollm");
    ctx.has_logprobs = logprobs;
    ctx.n_top_logprobs = logprobs ? 2 : 0;
    ctx.token_text = s_piece;
    return ctx;
}

static void test_completion_body(void) {
    s_fake_t f;
    s_fake_init(&f, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    rt_openai_ctx_t ctx = s_ctx(RT_OPENAI_COMPLETIONS, false);
    int http = 0;
    size_t len;
    char *body = rt_openai_response_body(&ctx, f.p, 3, &http, &len);
    REQUIRE(body);
    CHECK_EQ_INT(http, 200);
    CHECK_MSG(!strcmp(body, "{\"id\":\"cmpl-0000000000000abc\",\"object\":\"text_completion\",\"created\":1700000000,"
                            "\"model\":\"smollm\",\"choices\":[{\"index\":0,\"text\":\" Hello world!\",\"logprobs\":"
                            "null,\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":5,"
                            "\"completion_tokens\":4,\"total_tokens\":9}}"),
              "%s", body);
    free(body);
    /* legacy logprobs: parallel arrays; the sampled token is added to top_logprobs when not among them */
    ctx = s_ctx(RT_OPENAI_COMPLETIONS, true);
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    json_t *j = s_load(body);
    json_t *lp = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
    json_t *tokens = json_object_get(lp, "tokens"), *tl = json_object_get(lp, "token_logprobs");
    json_t *top = json_object_get(lp, "top_logprobs"), *off = json_object_get(lp, "text_offset");
    CHECK(json_array_size(tokens) == 4 && json_array_size(tl) == 4 && json_array_size(top) == 4 &&
          json_array_size(off) == 4);
    CHECK(!strcmp(json_string_value(json_array_get(tokens, 0)), " Hel"));
    CHECK(!strcmp(json_string_value(json_array_get(tokens, 3)), "!"));
    CHECK(json_real_value(json_array_get(tl, 0)) == -0.25 && json_real_value(json_array_get(tl, 3)) == -1.0);
    CHECK_EQ_INT(json_object_size(json_array_get(top, 0)), 2); /* " Hel" itself and " H" */
    CHECK_EQ_INT(json_object_size(json_array_get(top, 1)), 3); /* "p", "" and the sampled "lo" */
    CHECK(json_real_value(json_object_get(json_array_get(top, 1), "lo")) == -0.5);
    CHECK(json_real_value(json_object_get(json_array_get(top, 1), "")) == -9999.0); /* -inf */
    CHECK(json_integer_value(json_array_get(off, 0)) == 0 && json_integer_value(json_array_get(off, 1)) == 4 &&
          json_integer_value(json_array_get(off, 2)) == 6 && json_integer_value(json_array_get(off, 3)) == 12);
    CHECK(strstr(body, "\"token_logprobs\":[-0.25,-0.5,-0.75,-1.0]")); /* floats print short */
    json_decref(j);
    free(body);
    /* FINISH_ERROR: the worker's code and message */
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE;
    e.message = "decode worker lost";
    f.c[2].finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    f.c[2].error = &e;
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK_EQ_INT(http, 503);
    CHECK(strstr(body, "\"message\":\"decode worker lost\""));
    free(body);
    f.c[2].finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED;
    f.c[2].error = NULL;
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK_EQ_INT(http, 499);
    free(body);
    body = rt_openai_response_body(&ctx, f.p, 2, &http, NULL); /* no final chunk */
    CHECK_EQ_INT(http, 500);
    free(body);
    body = rt_openai_response_body(&ctx, NULL, 0, &http, NULL);
    CHECK_EQ_INT(http, 500);
    free(body);
}

static void test_chat_body(void) {
    s_fake_t f;
    s_fake_init(&f, PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    f.usage.cached_prompt_tokens = 3;
    rt_openai_ctx_t ctx = s_ctx(RT_OPENAI_CHAT, false);
    int http = 0;
    char *body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK_EQ_INT(http, 200);
    CHECK_MSG(!strcmp(body, "{\"id\":\"chatcmpl-0000000000000abc\",\"object\":\"chat.completion\",\"created\":"
                            "1700000000,\"model\":\"smollm\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                            "\"assistant\",\"content\":\" Hello world!\"},\"logprobs\":null,\"finish_reason\":"
                            "\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9,"
                            "\"prompt_tokens_details\":{\"cached_tokens\":3}}}"),
              "%s", body);
    free(body);
    ctx = s_ctx(RT_OPENAI_CHAT, true);
    ctx.n_top_logprobs = 1;
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    json_t *j = s_load(body);
    json_t *content =
        json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs"), "content");
    REQUIRE(json_array_size(content) == 4);
    json_t *e1 = json_array_get(content, 1);
    CHECK(!strcmp(s_str(e1, "token"), "lo")); /* from ctx.token_text: not among its alternatives */
    CHECK(json_real_value(json_object_get(e1, "logprob")) == -0.5);
    json_t *bytes = json_object_get(e1, "bytes");
    CHECK(json_array_size(bytes) == 2 && json_integer_value(json_array_get(bytes, 0)) == 'l');
    json_t *tops = json_object_get(e1, "top_logprobs");
    CHECK_EQ_INT(json_array_size(tops), 1); /* n_top_logprobs caps what the worker sent */
    CHECK(!strcmp(s_str(json_array_get(tops, 0), "token"), "p"));
    CHECK(json_object_size(json_array_get(tops, 0)) == 3); /* token, logprob, bytes */
    CHECK_MSG(strstr(body, "{\"token\":\" Hel\",\"logprob\":-0.25,\"bytes\":[32,72,101,108],\"top_logprobs\":"
                           "[{\"token\":\" Hel\",\"logprob\":-0.25,\"bytes\":[32,72,101,108]}]}"),
              "%s", body);
    json_decref(j);
    free(body);
    /* a token whose text nobody knows: "" and bytes null */
    ctx.token_text = NULL;
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK(strstr(body, "{\"token\":\"\",\"logprob\":-0.5,\"bytes\":null,"));
    free(body);
    /* a partial UTF-8 token: "\ufffd" in token, the raw bytes in bytes */
    f.top[0][0].text.data = (uint8_t *)"\xe2\x82";
    f.top[0][0].text.len = 2;
    body = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK_MSG(strstr(body, "{\"token\":\"\xef\xbf\xbd\xef\xbf\xbd\",\"logprob\":-0.25,\"bytes\":[226,130],"), "%s",
              body);
    free(body);
}

static char *s_stream_all(rt_openai_stream_t *s, const Pdserve__V1__ResponseChunk *const *c, size_t n) {
    size_t cap = 1 << 16, used = 0;
    char *all = calloc(1, cap);
    for (size_t i = 0; i < n; i++) {
        size_t len;
        char *ev = rt_openai_stream_chunk(s, c[i], &len);
        CHECK(ev && strlen(ev) == len);
        if (ev && used + len < cap) memcpy(all + used, ev, len), used += len;
        free(ev);
    }
    return all;
}

static void test_chat_stream(void) {
    s_fake_t f;
    s_fake_init(&f, PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    rt_openai_ctx_t ctx = s_ctx(RT_OPENAI_CHAT, false);
    ctx.is_stream = true;
    ctx.include_usage = true;
    rt_openai_stream_t s;
    rt_openai_stream_init(&s, &ctx);
    size_t len;
    char *begin = rt_openai_stream_begin(&s, &len);
    const char *head = "data: {\"id\":\"chatcmpl-0000000000000abc\",\"object\":\"chat.completion.chunk\",\"created\":"
                       "1700000000,\"model\":\"smollm\",\"choices\":[{\"index\":0,";
    char want[4096];
    snprintf(want, sizeof want,
             "%s\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
             "\"finish_reason\":null}]}\n\n",
             head);
    CHECK_MSG(!strcmp(begin, want), "%s", begin);
    CHECK_EQ_INT(len, strlen(want));
    free(begin);
    begin = rt_openai_stream_begin(&s, &len); /* only once */
    CHECK(begin && len == 0 && begin[0] == '\0');
    free(begin);
    char *all = s_stream_all(&s, f.p, 3);
    const char *usage_head = "data: {\"id\":\"chatcmpl-0000000000000abc\",\"object\":\"chat.completion.chunk\","
                             "\"created\":1700000000,\"model\":\"smollm\",\"choices\":[],";
    snprintf(want, sizeof want,
             "%s\"delta\":{\"content\":\" Hello\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"delta\":{\"content\":\" world\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"delta\":{\"content\":\"!\"},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n"
             "%s\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n"
             "data: [DONE]\n\n",
             head, head, head, usage_head);
    CHECK_MSG(!strcmp(all, want), "got:\n%s\nwant:\n%s", all, want);
    free(all);
    char *after = rt_openai_stream_chunk(&s, f.p[0], &len); /* after [DONE]: nothing */
    CHECK(after && len == 0);
    free(after);

    /* without begin: the first chunk brings the role event; an empty middle chunk sends nothing; a last
     * chunk without text gets an empty delta; no usage event without include_usage */
    ctx.include_usage = false;
    rt_openai_stream_init(&s, &ctx);
    Pdserve__V1__ResponseChunk empty = PDSERVE__V1__RESPONSE_CHUNK__INIT, last = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    last.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_LENGTH;
    const Pdserve__V1__ResponseChunk *seq[3] = {&f.c[0], &empty, &last};
    all = s_stream_all(&s, seq, 3);
    snprintf(want, sizeof want,
             "%s\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"delta\":{\"content\":\" Hello\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"delta\":{},\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n"
             "data: [DONE]\n\n",
             head, head, head);
    CHECK_MSG(!strcmp(all, want), "got:\n%s\nwant:\n%s", all, want);
    free(all);

    /* an error mid-stream: the error event, then [DONE] */
    rt_openai_stream_init(&s, &ctx);
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
    e.message = "deadline passed";
    last.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    last.error = &e;
    all = s_stream_all(&s, seq, 3);
    CHECK_MSG(strstr(all, "\"finish_reason\":null}]}\n\ndata: {\"error\":{\"message\":\"deadline passed\","
                          "\"type\":\"timeout_error\",\"param\":null,\"code\":\"deadline_exceeded\"}}\n\n"
                          "data: [DONE]\n\n"),
              "%s", all);
    free(all);
}

static void test_completion_stream(void) {
    s_fake_t f;
    s_fake_init(&f, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    rt_openai_ctx_t ctx = s_ctx(RT_OPENAI_COMPLETIONS, false);
    ctx.is_stream = true;
    rt_openai_stream_t s;
    rt_openai_stream_init(&s, &ctx);
    size_t len;
    char *begin = rt_openai_stream_begin(&s, &len); /* completions have no role event */
    CHECK(begin && len == 0);
    free(begin);
    char *all = s_stream_all(&s, f.p, 3);
    const char *head = "data: {\"id\":\"cmpl-0000000000000abc\",\"object\":\"text_completion\",\"created\":"
                       "1700000000,\"model\":\"smollm\",\"choices\":[{\"index\":0,";
    char want[4096];
    snprintf(want, sizeof want,
             "%s\"text\":\" Hello\",\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"text\":\" world\",\"logprobs\":null,\"finish_reason\":null}]}\n\n"
             "%s\"text\":\"!\",\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n"
             "data: [DONE]\n\n",
             head, head, head);
    CHECK_MSG(!strcmp(all, want), "got:\n%s\nwant:\n%s", all, want);
    free(all);
    /* logprobs per chunk; text_offset continues across chunks; usage falls back to the tokens seen */
    ctx = s_ctx(RT_OPENAI_COMPLETIONS, true);
    ctx.include_usage = true;
    f.c[2].usage = NULL;
    rt_openai_stream_init(&s, &ctx);
    all = s_stream_all(&s, f.p, 3);
    CHECK_MSG(strstr(all, "\"text\":\" world\",\"logprobs\":{\"tokens\":[\" world\"],\"token_logprobs\":[-0.75],"
                          "\"top_logprobs\":[{\" there\":-0.1,\" ther\":-9999.0,\" world\":-0.75}],"
                          "\"text_offset\":[6]},\"finish_reason\":null}"),
              "%s", all);
    CHECK_MSG(strstr(all, "\"choices\":[],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":4,"
                          "\"total_tokens\":4}}\n\ndata: [DONE]\n\n"),
              "%s", all);
    free(all);
}

static void test_misc_bodies(void) {
    CHECK(!strcmp(RT_OPENAI_SSE_KEEPALIVE, ": keep-alive\n\n"));
    CHECK(!strcmp(RT_OPENAI_SSE_DONE, "data: [DONE]\n\n"));
    size_t len;
    char *b = rt_openai_models_body(s_models, 2, 1700000000, "pdserve", &len);
    CHECK_MSG(!strcmp(b, "{\"object\":\"list\",\"data\":[{\"id\":\"smollm\",\"object\":\"model\",\"created\":"
                         "1700000000,\"owned_by\":\"pdserve\"},{\"id\":\"other-model\",\"object\":\"model\","
                         "\"created\":1700000000,\"owned_by\":\"pdserve\"}]}"),
              "%s", b);
    CHECK_EQ_INT(len, strlen(b));
    free(b);
    b = rt_openai_models_body(NULL, 0, 0, "pdserve", NULL);
    CHECK(!strcmp(b, "{\"object\":\"list\",\"data\":[]}"));
    free(b);
    /* chunk text that is not UTF-8 (a worker bug past validation) still yields valid JSON */
    s_fake_t f;
    s_fake_init(&f, PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    f.c[0].text = "ok\xc3";
    rt_openai_ctx_t ctx = s_ctx(RT_OPENAI_COMPLETIONS, false);
    int http;
    b = rt_openai_response_body(&ctx, f.p, 3, &http, NULL);
    CHECK_MSG(strstr(b, "\"text\":\"ok\xef\xbf\xbd world!\""), "%s", b);
    free(b);
}

/* ---- dump for tests/golden/openai/check_openai_shapes.py ---- */

static void s_write(const char *dir, const char *name, const char *s, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.json", dir, name);
    FILE *fp = fopen(path, "wb");
    CHECK_MSG(fp, "cannot write %s", path);
    if (!fp) return;
    fwrite(s, 1, n, fp);
    fclose(fp);
}

/* Writes each "data: {...}" event of an SSE stream as <kind>__<name>_<i>.json. */
static void s_write_sse(const char *dir, const char *kind, const char *name, const char *sse) {
    int i = 0;
    for (const char *p = sse; (p = strstr(p, "data: ")); i++) {
        p += 6;
        const char *end = strstr(p, "\n\n");
        if (!end) break;
        if (strncmp(p, "[DONE]", 6)) {
            char file[256];
            snprintf(file, sizeof file, "%s__%s_%d", !strncmp(p, "{\"error\"", 8) ? "error" : kind, name, i);
            s_write(dir, file, p, (size_t)(end - p));
        }
        p = end;
    }
}

static void test_dump(void) {
    const char *dir = getenv("RT_OPENAI_DUMP_DIR");
    if (!dir || !*dir) return;
    static const struct {
        rt_openai_endpoint_t ep;
        bool logprobs, usage;
        Pdserve__V1__FinishReason finish;
        const char *kind, *chunk_kind, *name;
    } cases[] = {
        {RT_OPENAI_COMPLETIONS, false, false, PDSERVE__V1__FINISH_REASON__FINISH_STOP, "completion", "completion_chunk",
         "plain"},
        {RT_OPENAI_COMPLETIONS, true, true, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH, "completion", "completion_chunk",
         "logprobs_usage"},
        {RT_OPENAI_CHAT, false, false, PDSERVE__V1__FINISH_REASON__FINISH_STOP, "chat_completion", "chat_chunk",
         "plain"},
        {RT_OPENAI_CHAT, true, true, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH, "chat_completion", "chat_chunk",
         "logprobs_usage"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s_fake_t f;
        s_fake_init(&f, cases[i].finish);
        f.usage.cached_prompt_tokens = cases[i].usage ? 2 : 0;
        rt_openai_ctx_t ctx = s_ctx(cases[i].ep, cases[i].logprobs);
        ctx.include_usage = cases[i].usage;
        int http;
        size_t len;
        char name[128];
        char *b = rt_openai_response_body(&ctx, f.p, 3, &http, &len);
        snprintf(name, sizeof name, "%s__%s", cases[i].kind, cases[i].name);
        s_write(dir, name, b, len);
        free(b);
        rt_openai_stream_t s;
        rt_openai_stream_init(&s, &ctx);
        b = rt_openai_stream_begin(&s, &len);
        char *rest = s_stream_all(&s, f.p, 3);
        size_t n = strlen(b) + strlen(rest) + 1;
        char *sse = malloc(n);
        snprintf(sse, n, "%s%s", b, rest);
        s_write_sse(dir, cases[i].chunk_kind, cases[i].name, sse);
        free(sse);
        free(rest);
        free(b);
    }
    /* errors: a parse error, a 404, a worker error mid-stream; the model list */
    rt_openai_error_t err;
    Pdserve__V1__GenerateRequest *r;
    CHECK_EQ_INT(s_parse(RT_OPENAI_CHAT, "{\"messages\":[],\"n\":1}", &r, NULL, &err), PD_EINVAL);
    size_t len;
    char *b = rt_openai_error_body(&err, &len);
    s_write(dir, "error__messages_empty", b, len);
    free(b);
    CHECK_EQ_INT(s_parse(RT_OPENAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"model\":\"m\"}", &r,
                         NULL, &err),
                 PD_EINVAL);
    b = rt_openai_error_body(&err, &len);
    s_write(dir, "error__model_not_found", b, len);
    free(b);
    b = rt_openai_error_sse(rt_openai_error_set(&err, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "worker lost"), &len);
    s_write_sse(dir, "error", "stream", b);
    free(b);
    b = rt_openai_models_body(s_models, 2, 1700000000, "pdserve", &len);
    s_write(dir, "models__list", b, len);
    free(b);
    fprintf(stderr, "wrote sample responses to %s\n", dir);
}

int main(void) {
    PD_TEST_RUN(test_completion_all_fields);
    PD_TEST_RUN(test_completion_defaults);
    PD_TEST_RUN(test_completion_prompt_forms);
    PD_TEST_RUN(test_chat_fields);
    PD_TEST_RUN(test_chat_refusals);
    PD_TEST_RUN(test_type_and_range_errors);
    PD_TEST_RUN(test_json_level_errors);
    PD_TEST_RUN(test_error_body);
    PD_TEST_RUN(test_completion_body);
    PD_TEST_RUN(test_chat_body);
    PD_TEST_RUN(test_chat_stream);
    PD_TEST_RUN(test_completion_stream);
    PD_TEST_RUN(test_misc_bodies);
    PD_TEST_RUN(test_dump);
    return pd_test_finish();
}
