-- benches/soak.sh: non-streaming chat completions, each with a random one of SOAK_KEYS (default
-- 50000) keys in the `x-soak-key` header (the rate-limit and token-limit filters' key).
--
-- Keys are drawn skewed: key index = floor(N * u^3), u uniform in [0, 1). Every key is used
-- (the coldest about 1/(3N) of the time), but the first few dozen take a large share of the
-- traffic, so some keys exceed their limits (429) at whatever rate this machine reaches, and
-- most never do.
--
-- response() counts statuses; done() prints them, plus wrk's socket errors, as lines that
-- soak.sh parses:
--   soak-status <code> <count>
--   soak-errors connect <n> read <n> write <n> timeout <n> status <n>
--   soak-requests <n>
local N = tonumber(os.getenv("SOAK_KEYS") or "50000")
local keys = {}
local threads = {}
counts = {}  -- a global: done() reads it from each thread with thread:get()

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"soak-1","max_tokens":16,"messages":[{"role":"user","content":"soak test prompt"}]}'
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for i = 1, N do
    keys[i] = string.format("soak-key-%05d", i - 1)
  end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local u = math.random()
  wrk.headers["x-soak-key"] = keys[math.floor(N * u * u * u) + 1]
  return wrk.format()
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for k, v in pairs(c) do
      all[k] = (all[k] or 0) + v
    end
  end
  for k, v in pairs(all) do
    io.write(string.format("soak-status %d %d\n", k, v))
  end
  local e = summary.errors
  io.write(string.format("soak-errors connect %d read %d write %d timeout %d status %d\n",
    e.connect, e.read, e.write, e.timeout, e.status))
  io.write(string.format("soak-requests %d\n", summary.requests))
end
