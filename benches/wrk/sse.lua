-- Streaming chat completion: POST /v1/chat/completions, "stream": true, consumer key sk-bench.
-- The client does not ask for usage (no stream_options); see sse-usage.lua for the variant that does.
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
