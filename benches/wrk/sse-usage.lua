-- As sse.lua, but the client asks for usage itself (stream_options.include_usage), so Ringway
-- forwards the frames unchanged (no "usage":null removal, usage-only frame kept).
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
