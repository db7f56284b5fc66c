-- Orthanc: send each study to ddn-node once it is stable (no new instance for StableAge s).
-- Only CR / DX studies; the node stores others too, but analyses chest radiographs.
function OnStableStudy(studyId, tags, metadata)
  local modalities = tags['ModalitiesInStudy'] or ''
  local study = ParseJson(RestApiGet('/studies/' .. studyId))
  local wanted = false
  for _, series in pairs(study['Series']) do
    local s = ParseJson(RestApiGet('/series/' .. series))
    local m = s['MainDicomTags']['Modality']
    if m == 'CR' or m == 'DX' then wanted = true end
  end
  -- Results the node sent back (SR, PM, SC from AE DDN_NODE) must not go round again.
  if wanted and metadata['RemoteAET'] ~= 'DDN_NODE' then
    print('forwarding study ' .. studyId .. ' to ddn-node')
    RestApiPost('/modalities/ddn-node/store', '{"Resources": ["' .. studyId .. '"], "Asynchronous": true}')
  end
end
