-- 64 KiB POST to /upload (the backend reads the whole body before answering 200 "ok").
-- wrk adds Content-Length for wrk.body.
wrk.method = "POST"
wrk.path = "/upload"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
