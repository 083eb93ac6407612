-- Argo CD health check of recupdate.io/RecommenderUpdatePolicy.
--   Degraded:    SpecValid=False (the spec is rejected) or Degraded=True (runs keep failing).
--   Progressing: no status yet, the operator has not observed the latest spec, or not Ready yet
--                (a fine-tune or refresh is producing the first release).
--   Healthy:     Ready=True (an active release is served), even while a refresh runs.
--   Suspended:   spec.suspend=true and not Ready.
local hs = {}

local function condition_map(status)
  local map = {}
  if status ~= nil and status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type ~= nil then
        map[c.type] = c
      end
    end
  end
  return map
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
local cond = condition_map(status)

if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the policy"
  return hs
end

if cond.SpecValid ~= nil and cond.SpecValid.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid spec: " .. describe(cond.SpecValid, "SpecValid is False")
  return hs
end

if cond.Degraded ~= nil and cond.Degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(cond.Degraded, "Degraded")
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if cond.Ready ~= nil and cond.Ready.status == "True" then
  hs.status = "Healthy"
  if status.activeRelease ~= nil then
    hs.message = "Serving release " .. status.activeRelease
  else
    hs.message = describe(cond.Ready, "Ready")
  end
  return hs
end

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended: no new runs are launched"
  return hs
end

if cond.FineTuning ~= nil and cond.FineTuning.status == "True" then
  hs.status = "Progressing"
  hs.message = "Fine-tuning: " .. describe(cond.FineTuning, "a fine-tune is running")
  return hs
end

if cond.Refreshing ~= nil and cond.Refreshing.status == "True" then
  hs.status = "Progressing"
  hs.message = "Refreshing: " .. describe(cond.Refreshing, "a refresh is running")
  return hs
end

hs.status = "Progressing"
hs.message = describe(cond.Ready, "Not ready yet")
return hs
