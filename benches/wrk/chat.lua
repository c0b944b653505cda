-- Non-streamed chat completion: POST /v1/chat/completions, consumer key sk-bench; the origin
-- answers a JSON chat.completion with usage (benches/backend/sse_backend.py without "stream").
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"m","max_tokens":600,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
